"""The error model: every row of the mapping table, for unary and streaming RPCs, over the real
server and stubs with a fake backend underneath."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2

from fakes import FakeBackend
from helpers import rich_error
from pluggably.api.status import ERROR_DOMAIN, STATUS_TABLE
from pluggably.core import errors
from pluggably.core.types import Modality
from pluggably.server import GatewayServer
from pluggably.v1 import (
    generate_service_pb2_grpc,
    generation_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    stream_service_pb2_grpc,
)

SECRET = "sk-live-do-not-leak-123"

# One instance per row of STATUS_TABLE, with the code it must map to.
ROWS = {
    errors.InvalidArgument: (
        errors.InvalidArgument([errors.FieldViolation("text.top_k", "bad")]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    errors.NotFound: (errors.ModelNotFound("fake/gone"), grpc.StatusCode.NOT_FOUND),
    errors.Unauthenticated: (
        errors.Unauthenticated("no API key", reason="API_KEY_MISSING"),
        grpc.StatusCode.UNAUTHENTICATED,
    ),
    errors.PermissionDenied: (
        errors.PermissionDenied("scope generate missing", reason="SCOPE_MISSING"),
        grpc.StatusCode.PERMISSION_DENIED,
    ),
    errors.FailedPrecondition: (
        errors.FailedPrecondition("model cannot load", reason="MODEL_LOAD_FAILED"),
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
    errors.ResourceExhausted: (
        errors.ResourceExhausted(
            "queue full", subject="fake/echo", retry_after_s=1.5, reason="MODEL_QUEUE_FULL"
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    errors.Unavailable: (
        errors.Unavailable("backend down", retry_after_s=2.0),
        grpc.StatusCode.UNAVAILABLE,
    ),
    errors.Unimplemented: (errors.Unimplemented("not yet"), grpc.StatusCode.UNIMPLEMENTED),
    errors.DeadlineExceeded: (
        errors.DeadlineExceeded("too slow"),
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ),
    errors.Cancelled: (errors.Cancelled("upstream cancelled"), grpc.StatusCode.CANCELLED),
}


def test_every_table_row_has_a_case() -> None:
    assert {cls for cls, _ in STATUS_TABLE} == set(ROWS)


@pytest.fixture(scope="module")
async def fake_server(config_for):
    backend = FakeBackend(models={"echo": Modality.TEXT, "other": Modality.TEXT})
    server = GatewayServer(config_for([]), backends=[backend])
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, backend, channel
    await server.stop(grace=0)


@pytest.fixture
def fake(fake_server):
    _server, backend, channel = fake_server
    backend.behaviours.clear()
    backend.error_after.clear()
    return backend, channel


def _request(model: str = "fake/echo", **kw) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(model=model, prompt="hi", **kw)


@pytest.mark.parametrize("cls", list(ROWS), ids=lambda c: c.__name__)
@pytest.mark.parametrize("rpc", ["unary", "stream"])
async def test_mapping_row(fake, cls, rpc) -> None:
    backend, channel = fake
    exc, code = ROWS[cls]
    backend.behaviours["echo"] = lambda _req: exc
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if rpc == "unary":
            await generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(_request())
        else:
            [
                c
                async for c in stream_service_pb2_grpc.StreamServiceStub(channel).StreamGenerate(
                    _request()
                )
            ]
    err = rich_error(caught.value)
    assert err.code == code
    assert err.message == exc.message
    assert (
        err.info is not None and err.info.reason == exc.reason and err.info.domain == ERROR_DOMAIN
    )
    assert err.info.metadata["request_id"]
    if cls is errors.InvalidArgument:
        assert err.fields == ["text.top_k"]
    if cls is errors.NotFound:
        assert err.details["google.rpc.ResourceInfo"].resource_name == "fake/gone"
    if cls is errors.ResourceExhausted:
        assert err.details["google.rpc.QuotaFailure"].violations[0].subject == "fake/echo"
        assert err.details["google.rpc.RetryInfo"].retry_delay.ToMilliseconds() == 1500
    if cls is errors.Unavailable:
        assert err.details["google.rpc.RetryInfo"].retry_delay.seconds == 2


@pytest.mark.parametrize("rpc", ["unary", "stream"])
async def test_unexpected_error_is_internal_without_its_text(fake, rpc, caplog) -> None:
    backend, channel = fake
    backend.behaviours["echo"] = lambda _req: RuntimeError(f"upstream said {SECRET}")
    metadata = (("x-request-id", f"req-{rpc}-42"),)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if rpc == "unary":
            await generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(
                _request(), metadata=metadata
            )
        else:
            [
                c
                async for c in stream_service_pb2_grpc.StreamServiceStub(channel).StreamGenerate(
                    _request(), metadata=metadata
                )
            ]
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.INTERNAL
    assert SECRET not in str(err.status) and "upstream" not in err.message
    assert f"req-{rpc}-42" in err.message
    assert err.info.reason == "INTERNAL" and err.info.metadata["request_id"] == f"req-{rpc}-42"


async def test_error_mid_stream_is_the_call_status_for_grpc_clients(fake) -> None:
    backend, channel = fake
    backend.error_after["echo"] = (2, errors.Unavailable("backend went away"))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in stream_service_pb2_grpc.StreamServiceStub(channel).StreamGenerate(
            _request()
        ):
            received.append(chunk)
    assert [c.text_delta.text for c in received] == ["hello", " "]
    assert rich_error(caught.value).code == grpc.StatusCode.UNAVAILABLE


async def test_error_mid_stream_is_a_final_event_when_asked_inline(fake) -> None:
    backend, channel = fake
    backend.error_after["echo"] = (2, errors.Unavailable("backend went away"))
    call = stream_service_pb2_grpc.StreamServiceStub(channel).StreamGenerate(
        _request(), metadata=(("x-pluggably-stream-errors", "inline"),)
    )
    chunks = [c async for c in call]
    assert await call.code() == grpc.StatusCode.OK
    assert [c.WhichOneof("event") for c in chunks] == ["text_delta", "text_delta", "error"]
    final = chunks[-1]
    assert (
        final.id == chunks[0].id
        and final.model == "fake/echo"
        and final.error.code == code_pb2.UNAVAILABLE
    )
    assert final.error.message == "backend went away"


async def test_request_id_is_echoed_in_header_and_response(fake) -> None:
    _backend, channel = fake
    call = generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(
        _request(), metadata=(("x-request-id", "abc-123"),)
    )
    response = await call
    assert response.id == "abc-123"
    assert ("x-request-id", "abc-123") in tuple(await call.initial_metadata())
    generated = await generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(
        _request(), metadata=(("x-request-id", "bad id with spaces"),)
    )
    assert generated.id and generated.id != "bad id with spaces"


@pytest.mark.parametrize(
    ("request_kwargs", "fields"),
    [
        ({"text": {"temperature": -0.5}}, ["text.temperature"]),
        ({"text": {"top_p": 1.5}}, ["text.top_p"]),
        ({"text": {"top_p": 0.0}}, ["text.top_p"]),
        ({"text": {"top_k": 0, "max_tokens": 0}}, ["text.max_tokens", "text.top_k"]),
        ({"text": {"temperature": float("nan")}}, ["text.temperature"]),
        ({"text": {"stop": ["", "x" * 300]}}, ["text.stop[0]", "text.stop[1]"]),
        (
            {"text": {"presence_penalty": 3, "repetition_penalty": 0}},
            ["text.repetition_penalty", "text.presence_penalty"],
        ),
    ],
)
async def test_bad_parameters_name_each_field(fake, request_kwargs, fields) -> None:
    _backend, channel = fake
    request = generation_pb2.GenerateRequest(model="fake/echo", prompt="hi", **request_kwargs)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(request)
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(err.fields) == sorted(fields)
    assert err.info.reason == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("request_kwargs", "fields"),
    [
        ({"model": "fake/echo"}, ["messages"]),
        ({"model": "", "prompt": "x"}, ["model"]),
        (
            {"model": "fake/echo", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
            ["prompt"],
        ),
        (
            {
                "model": "fake/echo",
                "messages": [{"role": "wizard", "content": "y"}, {"role": "user", "content": ""}],
            },
            ["messages[0].role", "messages[1].content"],
        ),
        (
            {"model": "fake/echo", "prompt": "x", "fallback_models": ["fake/echo"] * 9},
            ["fallback_models"],
        ),
    ],
)
async def test_bad_request_shape_names_each_field(fake, request_kwargs, fields) -> None:
    _backend, channel = fake
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [
            c
            async for c in stream_service_pb2_grpc.StreamServiceStub(channel).StreamGenerate(
                generation_pb2.GenerateRequest(**request_kwargs)
            )
        ]
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.fields == fields


async def test_unknown_model_and_provider_are_not_found(fake) -> None:
    _backend, channel = fake
    stub = generate_service_pb2_grpc.GenerateServiceStub(channel)
    for model in ("fake/missing", "nope/echo", "no-slash"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(_request(model))
        err = rich_error(caught.value)
        assert err.code == grpc.StatusCode.NOT_FOUND, model
        assert err.info.reason == "MODEL_NOT_FOUND"
        assert model in err.message


async def test_options_of_the_wrong_modality_are_rejected(fake) -> None:
    _backend, channel = fake
    request = _request(image=generation_pb2.ImageOptions(width=64))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(request)
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.fields == ["model"]


@pytest.mark.parametrize(
    "failure",
    [
        errors.Unavailable("down"),
        errors.ResourceExhausted("full", subject="fake/echo"),
        errors.FailedPrecondition("cannot load"),
    ],
)
async def test_fallback_serves_when_the_primary_fails_before_output(fake, failure) -> None:
    backend, channel = fake
    backend.behaviours["echo"] = lambda _req: failure
    response = await generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(
        _request(fallback_models=["fake/other"])
    )
    assert response.model == "fake/other" and response.text == "hello world"


async def test_no_fallback_for_errors_of_the_request_itself(fake) -> None:
    backend, channel = fake
    backend.behaviours["echo"] = lambda _req: errors.InvalidArgument(
        [errors.FieldViolation("text.max_tokens", "too big")]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(
            _request(fallback_models=["fake/other"])
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [r.model for r in backend.requests[-1:]] == ["echo"]


async def test_last_fallback_error_is_reported_when_all_fail(fake) -> None:
    backend, channel = fake
    backend.behaviours["echo"] = lambda _req: errors.Unavailable("first down")
    backend.behaviours["other"] = lambda _req: errors.Unavailable("second down")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(
            _request(fallback_models=["fake/other"])
        )
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.UNAVAILABLE
    # The client asked for fake/echo: the message says what it and the fallback answered.
    assert err.message == "fake/other: second down (tried first: fake/echo: UNAVAILABLE)"
    assert err.info.metadata["models_tried"] == "fake/echo,fake/other"


async def test_rpcs_a_server_cannot_serve_say_why(fake) -> None:
    """A server built over backends of its own (no local backend) has no model registry."""
    _backend, channel = fake
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await model_service_pb2_grpc.ModelServiceStub(channel).DownloadModel(
            model_service_pb2.DownloadModelRequest(repo_id="org/model")
        )
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.UNIMPLEMENTED
    assert "downloads no models" in err.message and err.info.reason == "NOT_IMPLEMENTED"


@pytest.mark.parametrize("with_options", [False, True])
async def test_unknown_fallback_is_rejected_up_front(fake, with_options) -> None:
    _backend, channel = fake
    options = {"text": generation_pb2.TextOptions(max_tokens=3)} if with_options else {}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(
            _request(fallback_models=["fake/other", "fake/nope"], **options)
        )
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.fields == ["fallback_models[1]"]


async def test_unexpected_failure_before_output_falls_back_else_is_internal(fake) -> None:
    backend, channel = fake
    backend.behaviours["echo"] = lambda _req: RuntimeError(SECRET)
    stub = generate_service_pb2_grpc.GenerateServiceStub(channel)
    served = await stub.Generate(_request(fallback_models=["fake/other"]))
    assert served.model == "fake/other"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(_request())
    assert caught.value.code() == grpc.StatusCode.INTERNAL and SECRET not in caught.value.details()


@pytest.mark.parametrize(
    "method",
    ["/pluggably.v1.GenerateService/Generate", "/pluggably.v1.StreamService/StreamGenerate"],
)
async def test_undecodable_request_is_invalid_argument(fake, method) -> None:
    _backend, channel = fake
    malformed = b"\x0a\x07local/\xff\x22\x02hi"  # field 1 (model) with invalid UTF-8
    if method.endswith("StreamGenerate"):
        call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)(
            malformed
        )
        receive = call.read()
    else:
        receive = channel.unary_unary(method, request_serializer=None, response_deserializer=None)(
            malformed
        )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await receive
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.info.reason == "MALFORMED_REQUEST" and err.fields == ["request"]
    assert "utf-8" not in err.message.lower()


def test_only_chunk_streams_get_inline_error_events() -> None:
    from pluggably.api.interceptors import _has_error_event
    from pluggably.v1 import model_pb2, stream_service_pb2

    assert _has_error_event(stream_service_pb2.StreamGenerateResponse())
    assert not _has_error_event(model_pb2.Download())  # has `id` and `error`, but is a resource
