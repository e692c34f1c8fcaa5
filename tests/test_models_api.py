"""ModelService over the real server: listing with filters and pagination, get, parameters."""

from __future__ import annotations

import grpc
import pytest

from fakes import FakeBackend
from helpers import rich_error
from pluggably.core.types import Modality
from pluggably.server import GatewayServer
from pluggably.v1 import model_pb2, model_service_pb2, model_service_pb2_grpc

MODELS = {f"m{i:02d}": Modality.TEXT for i in range(7)} | {"painter": Modality.IMAGE}


@pytest.fixture(scope="module")
async def stub(config_for):
    backends = [FakeBackend("alpha", dict(MODELS)), FakeBackend("beta", {"solo": Modality.TEXT})]
    server = GatewayServer(config_for([], aliases={"fav": "alpha/m03"}), backends=backends)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield model_service_pb2_grpc.ModelServiceStub(channel)
    await server.stop(grace=0)


async def test_list_all_sorted(stub) -> None:
    response = await stub.ListModels(model_service_pb2.ListModelsRequest())
    ids = [m.id for m in response.models]
    assert ids == sorted(ids) and len(ids) == 9 and not response.next_page_token
    assert next(m for m in response.models if m.id == "alpha/m03").aliases == ["fav"]


async def test_pagination_walks_every_model_once(stub) -> None:
    seen, token, pages = [], "", 0
    while True:
        page = await stub.ListModels(
            model_service_pb2.ListModelsRequest(page_size=4, page_token=token)
        )
        seen += [m.id for m in page.models]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3 and len(seen) == len(set(seen)) == 9


async def test_filters(stub) -> None:
    only_beta = await stub.ListModels(model_service_pb2.ListModelsRequest(provider="beta"))
    assert [m.id for m in only_beta.models] == ["beta/solo"]
    images = await stub.ListModels(
        model_service_pb2.ListModelsRequest(modality=model_pb2.MODALITY_IMAGE)
    )
    assert [m.id for m in images.models] == ["alpha/painter"]


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"page_size": -1}, "page_size"),
        ({"page_size": 1001}, "page_size"),
        ({"page_token": "garbage!"}, "page_token"),
    ],
)
async def test_bad_list_requests(stub, request_kwargs, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListModels(model_service_pb2.ListModelsRequest(**request_kwargs))
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.fields == [field]


async def test_page_token_is_bound_to_its_filters(stub) -> None:
    page = await stub.ListModels(model_service_pb2.ListModelsRequest(page_size=2))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListModels(
            model_service_pb2.ListModelsRequest(
                page_size=2, page_token=page.next_page_token, provider="beta"
            )
        )
    assert rich_error(caught.value).fields == ["page_token"]


async def test_get_model_by_id_and_alias(stub) -> None:
    by_alias = await stub.GetModel(model_service_pb2.GetModelRequest(id="fav"))
    assert by_alias.id == "alpha/m03" and list(by_alias.aliases) == ["fav"]
    model = await stub.GetModel(model_service_pb2.GetModelRequest(id="beta/solo"))
    assert (
        model.provider == "beta"
        and model.name == "solo"
        and model.modality == model_pb2.MODALITY_TEXT
    )
    assert model.state == model_pb2.MODEL_STATE_AVAILABLE
    for missing in ("alpha/none", "gamma/x"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetModel(model_service_pb2.GetModelRequest(id=missing))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetModel(model_service_pb2.GetModelRequest(id=""))
    assert rich_error(caught.value).fields == ["id"]


async def test_parameters_document_ranges(stub) -> None:
    response = await stub.GetModelParameters(model_service_pb2.GetModelParametersRequest(id="fav"))
    assert response.model == "alpha/m03"
    by_name = {p.name: p for p in response.parameters}
    top_p = by_name["text.top_p"]
    assert (
        top_p.type == model_pb2.PARAMETER_TYPE_NUMBER and top_p.maximum == 1 and top_p.minimum == 0
    )
    assert top_p.exclusive_minimum and top_p.default_value.number_value == 1
    assert by_name["text.seed"].default_value.WhichOneof("kind") == "null_value"
    assert by_name["text.stop"].type == model_pb2.PARAMETER_TYPE_STRING_LIST
