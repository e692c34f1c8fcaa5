"""The committed OpenAPI document (envoy/openapi.json) against the contract (envoy/pluggably.pb).

The expected REST surface is read from the descriptor set with googleapis' own `google.api.http`
extension, independently of the generator's wire-level decoding.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2
from openapi_spec_validator import validate

REPO_ROOT = Path(__file__).resolve().parent.parent
DESCRIPTOR_SET = REPO_ROOT / "envoy" / "pluggably.pb"
OPENAPI = REPO_ROOT / "envoy" / "openapi.json"
PACKAGE = "pluggably.v1"
HTTP_METHODS = {"get", "put", "post", "delete", "patch"}
SCHEMAS = "#/components/schemas/"


@cache
def _load_generator():
    from pluggably.devtools import openapi_gen

    return openapi_gen


@cache
def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return json.loads(OPENAPI.read_text(encoding="utf-8"))


def schema(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return doc["components"]["schemas"][name]


def operations(doc: dict[str, Any]):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in HTTP_METHODS:
                yield path, method, op


def openapi_path(template: str) -> str:
    return re.sub(r"\{([^}=]+)(=[^}]*)?\}", r"{\1}", template)


def expected_bindings() -> set[tuple[str, str, str]]:
    """(path, method, gRPC method) for every google.api.http binding of the pluggably services."""
    out = set()
    for f in descriptor_set().file:
        if f.package != PACKAGE:
            continue
        for service in f.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                for r in [rule, *rule.additional_bindings]:
                    kind = r.WhichOneof("pattern")
                    if kind is None:
                        continue
                    verb, path = (
                        (r.custom.kind.lower(), r.custom.path)
                        if kind == "custom"
                        else (kind, getattr(r, kind))
                    )
                    grpc = f"/{PACKAGE}.{service.name}/{method.name}"
                    out.add((openapi_path(path), verb, grpc))
    return out


def test_document_is_valid_openapi(doc: dict[str, Any]) -> None:
    validate(doc)
    assert doc["openapi"] == "3.0.3"
    assert doc["info"]["title"] == "Pluggably API"
    assert doc["servers"] == [{"url": "http://localhost:8080"}]


def test_every_http_binding_is_documented_and_nothing_else(doc: dict[str, Any]) -> None:
    expected = expected_bindings()
    assert len(expected) >= 17  # the descriptor set really carries the annotations
    documented = {(path, method, op["x-grpc-method"]) for path, method, op in operations(doc)}
    assert documented == expected


def test_regenerating_gives_the_committed_file() -> None:
    gen = _load_generator()
    text = gen.render(gen.generate(DESCRIPTOR_SET.read_bytes()))
    assert text == OPENAPI.read_text(encoding="utf-8"), (
        "envoy/openapi.json is stale: run "
        "python -m pluggably.devtools.openapi_gen envoy/pluggably.pb -o envoy/openapi.json"
    )


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs
    for ref in refs:
        target: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]


def test_operation_ids_tags_and_errors(doc: dict[str, Any]) -> None:
    for _, _, op in operations(doc):
        service, method = op["x-grpc-method"].removeprefix(f"/{PACKAGE}.").split("/")
        assert op["operationId"] == f"{service}_{method}"
        assert op["tags"] == [service]
        assert op["summary"] and op["description"]
        responses = op["responses"]
        assert responses["default"] == {"$ref": "#/components/responses/Error"}
        assert {"200", "400", "404"} <= responses.keys()
    error = doc["components"]["responses"]["Error"]["content"]["application/json"]["schema"]
    assert error == {"$ref": SCHEMAS + "google.rpc.Status"}
    status = schema(doc, "google.rpc.Status")["properties"]
    assert status["code"]["type"] == "integer"
    assert status["details"]["items"] == {"$ref": SCHEMAS + "google.protobuf.Any"}
    assert "google.rpc.BadRequest" in doc["components"]["schemas"]


def test_generate_request_json_mapping(doc: dict[str, Any]) -> None:
    request = schema(doc, "pluggably.v1.GenerateRequest")
    assert request["required"] == ["model"]
    props = request["properties"]
    assert {"model", "fallbackModels", "messages", "prompt", "providerOptions"} <= props.keys()
    assert not [name for name in props if "_" in name]
    assert props["fallbackModels"] == {**props["fallbackModels"], "type": "array"}
    assert props["providerOptions"]["type"] == "object"
    assert props["providerOptions"]["additionalProperties"] == {"description": "Any JSON value."}
    assert props["text"]["allOf"] == [{"$ref": SCHEMAS + "pluggably.v1.TextOptions"}]
    assert "Only one of `text`, `image`, `mesh` may be set" in props["image"]["description"]

    text = schema(doc, "pluggably.v1.TextOptions")["properties"]
    assert (text["maxTokens"]["type"], text["maxTokens"]["format"]) == ("integer", "int32")
    assert (text["seed"]["type"], text["seed"]["format"]) == ("string", "int64")
    assert text["temperature"]["type"] == "number"
    assert text["stop"]["items"] == {"type": "string"}
    assert schema(doc, "pluggably.v1.ChatMessage")["required"] == ["role"]


def test_enums_and_output_only_fields(doc: dict[str, Any]) -> None:
    finish = schema(doc, "pluggably.v1.FinishReason")
    assert finish["type"] == "string"
    assert finish["enum"] == [
        "FINISH_REASON_UNSPECIFIED",
        "FINISH_REASON_STOP",
        "FINISH_REASON_LENGTH",
        "FINISH_REASON_CANCELLED",
        "FINISH_REASON_CONTENT_FILTER",
        "FINISH_REASON_TOOL_CALLS",
    ]
    artifact = schema(doc, "pluggably.v1.Artifact")["properties"]
    assert all(p.get("readOnly") for p in artifact.values())
    assert artifact["createTime"]["format"] == "date-time"
    assert artifact["inlineData"]["format"] == "byte"
    prune = schema(doc, "pluggably.v1.PruneStorageRequest")["properties"]
    assert prune["olderThan"]["type"] == "string" and "readOnly" not in prune["olderThan"]


def test_streaming_and_raw_responses(doc: dict[str, Any]) -> None:
    stream = doc["paths"]["/v1/generate:stream"]["post"]
    assert stream["x-grpc-method"] == "/pluggably.v1.StreamService/StreamGenerate"
    ok = stream["responses"]["200"]
    assert list(ok["content"]) == ["text/event-stream"]
    assert ok["content"]["text/event-stream"]["schema"] == {
        "$ref": SCHEMAS + "pluggably.v1.StreamGenerateResponse"
    }
    assert "data:" in ok["description"]
    body = stream["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": SCHEMAS + "pluggably.v1.GenerateRequest"}

    unary = doc["paths"]["/v1/generate"]["post"]["responses"]
    assert unary["200"]["content"]["application/json"]["schema"] == {
        "$ref": SCHEMAS + "pluggably.v1.GenerateResponse"
    }
    assert {"429", "503"} <= unary.keys()  # RESOURCE_EXHAUSTED, UNAVAILABLE in the comment

    watch = doc["paths"]["/v1/downloads/{id}:watch"]["get"]["responses"]["200"]["content"]
    assert list(watch) == ["text/event-stream"]

    raw = doc["paths"]["/v1/artifacts/{id}:content"]["get"]["responses"]["200"]["content"]
    assert raw == {"*/*": {"schema": {"type": "string", "format": "binary"}}}


def test_path_and_query_parameters(doc: dict[str, Any]) -> None:
    get_model = doc["paths"]["/v1/models/{id}"]["get"]
    (param,) = get_model["parameters"]
    assert (param["name"], param["in"], param["required"]) == ("id", "path", True)
    assert "may contain `/`" in param["description"]
    assert "requestBody" not in get_model

    list_models = doc["paths"]["/v1/models"]["get"]["parameters"]
    assert [(p["name"], p["in"]) for p in list_models] == [
        ("pageSize", "query"),
        ("pageToken", "query"),
        ("provider", "query"),
        ("modality", "query"),
        ("state", "query"),
        ("query", "query"),
    ]
    assert list_models[3]["schema"] == {"$ref": SCHEMAS + "pluggably.v1.Modality"}

    cancel = doc["paths"]["/v1/downloads/{id}:cancel"]["post"]
    body = cancel["requestBody"]["content"]["application/json"]["schema"]
    assert "id" not in body["properties"]  # the path field is not repeated in the body
    for _, method, op in operations(doc):
        if method in {"get", "delete"}:
            assert "requestBody" not in op


def _synthetic_descriptor_set() -> bytes:
    """pluggably.v1 with a binding shape the real contract does not use (yet): a custom verb in
    additional_bindings, `body: "field"`, a resource-name path pattern and nested query fields."""
    base = descriptor_set()
    keep = {
        "google/protobuf/descriptor.proto",
        "google/api/http.proto",
        "google/protobuf/any.proto",
        "google/rpc/status.proto",
    }
    fds = descriptor_pb2.FileDescriptorSet(file=[f for f in base.file if f.name in keep])
    f = fds.file.add(name="pluggably/v1/synthetic.proto", package=PACKAGE, syntax="proto3")
    FDP = descriptor_pb2.FieldDescriptorProto
    inner = f.message_type.add(name="Inner")
    inner.field.add(name="a_b", number=1, type=FDP.TYPE_STRING, json_name="aB")
    thing = f.message_type.add(name="Thing")
    thing.field.add(name="name", number=1, type=FDP.TYPE_STRING, json_name="name")
    thing.field.add(name="big", number=2, type=FDP.TYPE_UINT64, json_name="big")
    entry = thing.nested_type.add(name="CountsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=FDP.TYPE_INT32, json_name="key")
    entry.field.add(name="value", number=2, type=FDP.TYPE_DOUBLE, json_name="value")
    thing.field.add(
        name="counts",
        number=3,
        type=FDP.TYPE_MESSAGE,
        label=FDP.LABEL_REPEATED,
        type_name=".pluggably.v1.Thing.CountsEntry",
        json_name="counts",
    )
    request = f.message_type.add(name="UpdateThingRequest")
    request.field.add(
        name="thing", number=1, type=FDP.TYPE_MESSAGE, type_name=".pluggably.v1.Thing"
    )
    request.field.add(name="validate_only", number=2, type=FDP.TYPE_BOOL, json_name="validateOnly")
    request.field.add(
        name="filter", number=3, type=FDP.TYPE_MESSAGE, type_name=".pluggably.v1.Inner"
    )
    service = f.service.add(name="ThingService")
    method = service.method.add(
        name="UpdateThing",
        input_type=".pluggably.v1.UpdateThingRequest",
        output_type=".pluggably.v1.Thing",
    )
    rule = http_pb2.HttpRule(patch="/v1/{thing.name=things/*}", body="thing")
    rule.additional_bindings.add(post="/v1/{thing.name=things/*}:touch", body="*")
    method.options.Extensions[annotations_pb2.http].CopyFrom(rule)
    return fds.SerializeToString()


def test_generator_handles_other_binding_shapes() -> None:
    gen = _load_generator()
    doc = gen.generate(_synthetic_descriptor_set())
    validate(doc)
    patch = doc["paths"]["/v1/{thing.name}"]["patch"]
    post = doc["paths"]["/v1/{thing.name}:touch"]["post"]
    assert (patch["operationId"], post["operationId"]) == (
        "ThingService_UpdateThing",
        "ThingService_UpdateThing_1",
    )
    params = [(p["name"], p["in"]) for p in patch["parameters"]]
    assert params == [("thing.name", "path"), ("validateOnly", "query"), ("filter.aB", "query")]
    assert "`things/*`" in patch["parameters"][0]["description"]
    body = patch["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": SCHEMAS + "pluggably.v1.Thing"}
    assert [p["name"] for p in post["parameters"]] == ["thing.name"]
    thing = doc["components"]["schemas"]["pluggably.v1.Thing"]["properties"]
    assert thing["big"]["type"] == "string"
    assert thing["counts"]["additionalProperties"] == {"type": "number", "format": "double"}
