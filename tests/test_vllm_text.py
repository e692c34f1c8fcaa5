"""The vLLM text runner, against an engine double that speaks vLLM's engine API.

vLLM needs CUDA wheels and a GPU, which the machines running this suite lack. `vllm_double`
stands in for it under vLLM's own module names, with vLLM's signatures, defaults and documented
behaviour (deltas vs cumulative outputs, max_tokens, stop strings, seeds, abort), so these tests
hold the runner to vLLM's contract rather than to itself; the tokenizer and chat template are the
tiny model's real ones. `test_real_vllm_engine` runs the same checks against vLLM itself where
it is installed and a CUDA GPU is present.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import vllm_double
from vllm_double import Harness, RequestOutputKind, SamplingType

from pluggably.core.errors import InvalidArgument, ModelNotFound, Unavailable
from pluggably.core.types import (
    ChatMessage,
    Chunk,
    DoneChunk,
    FinishReason,
    GenerationRequest,
    ModelState,
    TextChunk,
    TextParams,
)
from pluggably.runners.vllm_text import LocalVllmModel, VllmTextBackend

SCRIPT = vllm_double.DEFAULT_SCRIPT
HELLO = (ChatMessage("system", "You are a helpful robot."), ChatMessage("user", "Tell me a story."))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    """The tiny model's tokenizer, loaded here independently of the runner and the double."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)


@pytest.fixture
def vllm(monkeypatch: pytest.MonkeyPatch) -> Harness:
    return vllm_double.install(monkeypatch)


@pytest.fixture
async def make_backend(vllm: Harness, tiny_model_dir: Path):
    backends: list[VllmTextBackend] = []

    def make(**settings: Any) -> VllmTextBackend:
        settings.setdefault("path", tiny_model_dir)
        backend = VllmTextBackend([LocalVllmModel("tiny", **settings)])
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        await backend.aclose()


def chat(request_id: str = "req", *, ignore_eos: bool = False, **params: Any) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        model="tiny",
        messages=HELLO,
        text=TextParams(**params),
        provider_options={"ignore_eos": True} if ignore_eos else {},
    )


async def collect(backend: VllmTextBackend, request: GenerationRequest) -> list[Chunk]:
    return [chunk async for chunk in backend.generate(request)]


def split(chunks: list[Chunk]) -> tuple[list[TextChunk], DoneChunk]:
    assert isinstance(chunks[-1], DoneChunk), chunks[-1]
    assert all(isinstance(c, TextChunk) for c in chunks[:-1])
    return chunks[:-1], chunks[-1]  # type: ignore[return-value]


def chat_ids(tokenizer: Any) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in HELLO],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    return list(rendered)


async def test_deltas_concatenate_to_the_full_text_and_ids(make_backend, vllm, tokenizer):
    backend = make_backend()
    texts, done = split(await collect(backend, chat(temperature=0, max_tokens=200)))

    script_ids = tokenizer.encode(SCRIPT, add_special_tokens=False)
    assert len(texts) > 5  # streamed, not one final blob
    assert "".join(c.text for c in texts) == SCRIPT
    assert [i for c in texts for i in c.token_ids] == [*script_ids, tokenizer.eos_token_id]
    assert done.finish_reason is FinishReason.STOP and done.stop_sequence == ""
    # The engine got the conversation rendered with the model's chat template, as token ids.
    (engine,) = vllm.engines
    assert engine.calls[0][2] == chat_ids(tokenizer)
    assert done.usage.prompt_tokens == len(chat_ids(tokenizer))
    assert done.usage.completion_tokens == len(script_ids) + 1
    # Built off the event loop (construction blocks for as long as the weights load).
    assert engine.built_on_thread != threading.get_ident()


async def test_engine_args_carry_the_model_settings(make_backend, vllm, tiny_model_dir):
    backend = make_backend(
        tensor_parallel_size=1, gpu_memory_utilization=0.5, max_model_len=256, dtype="bfloat16"
    )
    await collect(backend, chat(max_tokens=2))
    args = vllm.engines[0].engine_args
    assert args.model == str(tiny_model_dir)
    assert (args.gpu_memory_utilization, args.max_model_len, args.dtype) == (0.5, 256, "bfloat16")
    info = backend.describe("tiny")
    assert info is not None and info.loaded and info.context_length == 256


async def test_every_text_param_reaches_sampling_params(make_backend, vllm):
    backend = make_backend()
    request = GenerationRequest(
        request_id="all",
        model="tiny",
        prompt="The weather report for tomorrow:",
        text=TextParams(
            max_tokens=7,
            temperature=0.7,
            top_p=0.8,
            top_k=5,
            seed=11,
            stop=("xyz", "qq"),
            repetition_penalty=1.2,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
        ),
        provider_options={"ignore_eos": True},
    )
    _texts, done = split(await collect(backend, request))
    (sp,) = vllm.engines[0].sampling_params()
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (7, 0.7, 0.8, 5, 11)
    assert sp.stop == ["xyz", "qq"] and sp.include_stop_str_in_output is False
    assert (sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty) == (1.2, 0.5, -0.5)
    assert sp.ignore_eos is True and sp.n == 1
    assert sp.output_kind is RequestOutputKind.DELTA
    assert sp.sampling_type is SamplingType.RANDOM_SEED
    assert done.finish_reason is FinishReason.LENGTH and done.usage.completion_tokens == 7


async def test_max_tokens_is_always_set(make_backend, vllm, tokenizer):
    backend = make_backend(default_max_tokens=5)
    _texts, done = split(await collect(backend, chat(temperature=0)))
    assert vllm.engines[0].sampling_params()[0].max_tokens == 5  # not vLLM's default of 16
    assert done.finish_reason is FinishReason.LENGTH and done.usage.completion_tokens == 5

    # Never more than the context leaves after the prompt.
    prompt_len = len(chat_ids(tokenizer))
    tight = make_backend(max_model_len=prompt_len + 3)
    _texts, done = split(await collect(tight, chat(temperature=0)))
    assert vllm.engines[1].sampling_params()[0].max_tokens == 3
    assert done.usage.completion_tokens == 3


async def test_temperature_zero_is_greedy_and_unset_fields_take_the_model_defaults(
    make_backend, vllm, tiny_model_dir, tmp_path
):
    backend = make_backend()
    first = split(await collect(backend, chat("a", temperature=0, top_p=0.5, max_tokens=12)))
    second = split(await collect(backend, chat("b", temperature=0, max_tokens=12)))
    greedy = vllm.engines[0].sampling_params()
    assert [sp.temperature for sp in greedy] == [0, 0]
    assert all(sp.sampling_type is SamplingType.GREEDY for sp in greedy)
    assert [c.token_ids for c in first[0]] == [c.token_ids for c in second[0]]
    assert "".join(c.text for c in first[0]) == SCRIPT[: len("".join(c.text for c in first[0]))]

    # A model whose generation_config.json samples: its values run when a request sets none,
    # and they are what GetModelParameters reports.
    folder = tmp_path / "sampling-model"
    shutil.copytree(tiny_model_dir, folder)
    gen_config = json.loads((folder / "generation_config.json").read_text())
    gen_config.update(temperature=0.6, top_p=0.9, top_k=40)
    (folder / "generation_config.json").write_text(json.dumps(gen_config))
    sampling = make_backend(path=folder)
    await collect(sampling, chat(max_tokens=3))
    await collect(sampling, chat("c", max_tokens=3, top_p=0.5))
    defaults, overridden = vllm.engines[1].sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (0.6, 0.9, 40)
    assert (overridden.temperature, overridden.top_p) == (0.6, 0.5)
    info = sampling.describe("tiny")
    assert info is not None
    specs = {spec.name: spec for spec in sampling.parameters(info)}
    assert specs["text.temperature"].default == 0.6 and specs["text.top_p"].default == 0.9
    assert specs["text.top_k"].default == 40 and specs["text.max_tokens"].default == 256


async def test_a_seed_is_reproducible(make_backend, vllm):
    backend = make_backend()

    async def ids(seed: int) -> list[int]:
        texts, _done = split(
            await collect(backend, chat(temperature=1.0, seed=seed, max_tokens=24))
        )
        return [i for c in texts for i in c.token_ids]

    assert await ids(5) == await ids(5)
    assert await ids(5) != await ids(6)


async def test_a_stop_string_ends_the_text_before_it(make_backend, vllm):
    backend = make_backend()
    chunks = await collect(backend, chat(temperature=0, max_tokens=200, stop=("cat", "robot")))
    texts, done = split(chunks)
    text = "".join(c.text for c in texts)
    # The earliest stop string in the text wins, and none of it reaches the client.
    assert text == SCRIPT[: SCRIPT.index("robot")]
    assert done.finish_reason is FinishReason.STOP and done.stop_sequence == "robot"
    assert all("rob" not in c.text for c in texts)
    assert done.usage.completion_tokens == sum(len(c.token_ids) for c in texts)


async def test_cancelling_the_consumer_aborts_the_request_within_one_step(make_backend, vllm):
    vllm.settings.step_s = 0.02
    backend = make_backend()
    got: list[Chunk] = []
    three = asyncio.Event()

    async def consume() -> None:
        async for chunk in backend.generate(
            chat("cancel-me", temperature=0, max_tokens=400, ignore_eos=True)
        ):
            got.append(chunk)
            if len(got) == 3:
                three.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(three.wait(), 5)
    (engine,) = vllm.engines
    (request_id,) = engine.requests_generated()
    before_cancel = engine.generated[request_id]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert request_id in engine.aborted(internal=False)  # the runner's own abort
    at_abort = engine.generated[request_id]
    assert at_abort - before_cancel <= 1
    await asyncio.sleep(vllm.settings.step_s * 5)
    assert engine.generated[request_id] == at_abort  # nothing after the abort
    assert not backend.in_use("tiny") and backend.active_generations() == 0


async def test_closing_the_stream_aborts_at_once(make_backend, vllm):
    vllm.settings.step_s = 0.02
    backend = make_backend()
    stream = backend.generate(chat("close-me", temperature=0, max_tokens=400, ignore_eos=True))
    first = await stream.__anext__()
    assert isinstance(first, TextChunk)
    (engine,) = vllm.engines
    steps = engine.steps
    await stream.aclose()
    (request_id,) = engine.requests_generated()
    assert engine.aborted(internal=False) == [request_id]
    assert engine.steps - steps <= 1
    produced = engine.generated[request_id]
    await asyncio.sleep(vllm.settings.step_s * 4)
    assert engine.generated[request_id] == produced
    assert not backend.in_use("tiny")


async def test_two_concurrent_requests_interleave(make_backend, vllm):
    vllm.settings.step_s = 0.03
    backend = make_backend()
    events: list[tuple[str, str]] = []

    async def run(name: str) -> None:
        request = chat(name, temperature=0, max_tokens=12)
        async for chunk in backend.generate(request):
            events.append((name, type(chunk).__name__))

    await asyncio.gather(run("a"), run("b"))
    first_text = {name: events.index((name, "TextChunk")) for name in "ab"}
    done = {name: events.index((name, "DoneChunk")) for name in "ab"}
    assert max(first_text.values()) < min(done.values())
    # Batched: the engine advanced both in the same steps, not one after the other.
    assert vllm.engines[0].max_batch == 2


async def test_an_engine_that_fails_to_start_is_unavailable(make_backend, vllm):
    vllm.settings.fail_with = RuntimeError(
        "CUDA out of memory. Tried to allocate 20.00 GiB\n  File /srv/secret/frame.py, line 3"
    )
    backend = make_backend()
    with pytest.raises(Unavailable) as caught:
        await collect(backend, chat())
    assert caught.value.reason == "MODEL_LOAD_FAILED"
    assert "RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB" in caught.value.message
    assert "secret" not in caught.value.message
    info = backend.describe("tiny")
    assert info is not None and info.state is ModelState.ERROR and not info.loaded
    # Refused at once until the retry delay has passed: no second start.
    with pytest.raises(Unavailable):
        await collect(backend, chat())
    assert vllm.build_attempts == 1 and not backend.in_use("tiny")


async def test_a_prompt_too_long_is_invalid_before_generating(make_backend, vllm):
    backend = make_backend(max_model_len=48)
    long_prompt = "Once upon a time there was a little robot. " * 20
    with pytest.raises(InvalidArgument) as caught:
        await collect(backend, GenerationRequest(request_id="p", model="tiny", prompt=long_prompt))
    assert [v.field for v in caught.value.violations] == ["prompt"]
    long_chat = (ChatMessage("user", long_prompt),)
    with pytest.raises(InvalidArgument) as caught:
        await collect(backend, GenerationRequest(request_id="m", model="tiny", messages=long_chat))
    assert [v.field for v in caught.value.violations] == ["messages"]
    with pytest.raises(InvalidArgument) as caught:
        await collect(backend, chat(max_tokens=30))
    assert [v.field for v in caught.value.violations] == ["text.max_tokens"]
    assert vllm.engines[0].requests_generated() == []  # the engine never saw them


async def test_the_engines_own_prompt_check_is_invalid_argument(
    make_backend, vllm, tiny_model_dir, tmp_path
):
    # An engine that does not expose its limit and a config that names none: only vLLM's own
    # check (a ValueError, context 2048 by vLLM's default) stands in the way.
    vllm.settings.expose_model_config = False
    folder = tmp_path / "no-context"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["max_position_embeddings"]
    (folder / "config.json").write_text(json.dumps(config))
    backend = make_backend(path=folder)
    prompt = "Once upon a time there was a little robot. " * 400
    with pytest.raises(InvalidArgument) as caught:
        await collect(backend, GenerationRequest(request_id="v", model="tiny", prompt=prompt))
    (violation,) = caught.value.violations
    assert violation.field == "prompt"
    assert "is longer than the maximum model length of 2048" in violation.description


async def test_a_dead_engine_is_unavailable_and_restarts(make_backend, vllm):
    backend = make_backend()
    await collect(backend, chat(max_tokens=2))
    vllm.engines[0].kill()
    with pytest.raises(Unavailable) as caught:
        await collect(backend, chat(max_tokens=2))
    assert caught.value.reason == "ENGINE_DEAD"
    _texts, done = split(await collect(backend, chat(max_tokens=2)))
    assert done.finish_reason is FinishReason.LENGTH
    assert len(vllm.engines) == 2 and vllm.engines[0].shut_down


async def test_shutdown_cancels_running_generations(make_backend, vllm):
    vllm.settings.step_s = 0.02
    backend = make_backend()
    stream = backend.generate(chat(temperature=0, max_tokens=400, ignore_eos=True))
    assert isinstance(await stream.__anext__(), TextChunk)
    await backend.aclose()
    rest = [chunk async for chunk in stream]
    assert isinstance(rest[-1], DoneChunk) and rest[-1].finish_reason is FinishReason.CANCELLED
    assert vllm.engines[0].shut_down
    assert not await backend.health()


async def test_catalogue_before_and_after_the_engine_starts(make_backend, vllm):
    backend = make_backend(description="tiny on vLLM")
    (info,) = await backend.list_models()
    assert (info.id, info.state, info.loaded) == ("local/tiny", ModelState.AVAILABLE, False)
    assert info.context_length == 512 and info.size_bytes > 0  # from config.json
    assert vllm.engines == []  # listing never starts an engine
    with pytest.raises(ModelNotFound):
        await collect(backend, GenerationRequest(request_id="x", model="other", prompt="hi"))
    await collect(backend, chat(max_tokens=1))
    assert backend.describe("tiny").loaded  # type: ignore[union-attr]
    assert await backend.health()
    assert backend.drop_model("tiny") and backend.served_names() == []
    for _ in range(100):  # the engine shuts down in a worker thread
        if vllm.engines[0].shut_down:
            break
        await asyncio.sleep(0.01)
    assert vllm.engines[0].shut_down


async def test_the_double_honours_delta_and_cumulative_outputs(vllm, tiny_model_dir):
    """The double itself, against vLLM's documented output kinds (what the tests above rely on)."""
    from vllm_double import AsyncEngineArgs, AsyncLLM, SamplingParams

    async def run(kind: RequestOutputKind, step_s: float = 0.0) -> list[Any]:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(tiny_model_dir)))
        params = SamplingParams(temperature=0, max_tokens=10, output_kind=kind)
        outputs = []
        async for out in engine.generate("Hello", params, "r"):
            outputs.append(out)
            await asyncio.sleep(step_s)  # a slow reader gets merged outputs
        engine.shutdown()
        return outputs

    delta = await run(RequestOutputKind.DELTA)
    cumulative = await run(RequestOutputKind.CUMULATIVE)
    slow = await run(RequestOutputKind.DELTA, step_s=0.01)
    final = await run(RequestOutputKind.FINAL_ONLY)
    joined = "".join(o.outputs[0].text for o in delta)
    assert joined and cumulative[-1].outputs[0].text == joined
    assert [o.outputs[0].text for o in cumulative] == [
        "".join(o.outputs[0].text for o in delta[: i + 1]) for i in range(len(delta))
    ]
    assert [len(o.outputs[0].token_ids) for o in delta] == [1] * 10
    assert len(slow) < len(delta) and "".join(o.outputs[0].text for o in slow) == joined
    assert len(final) == 1 and final[0].outputs[0].finish_reason == "length"
    assert SamplingParams().max_tokens == 16  # vLLM's default, why the runner always sets it


def test_the_module_imports_without_vllm_or_torch():
    code = (
        "import sys, pluggably.runners.vllm_text\n"
        "assert not {'vllm', 'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_real_vllm_engine(request: pytest.FixtureRequest, tmp_path: Path):
    """The runner against vLLM itself: a tiny random Llama, greedy, a stop string, a cancel."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (it needs CUDA wheels: pip install vllm on a GPU host)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: vLLM's engine needs one")
    model_dir = request.getfixturevalue("tiny_model_dir")
    backend = VllmTextBackend(
        [LocalVllmModel("tiny", model_dir, gpu_memory_utilization=0.3, max_model_len=512)]
    )
    try:
        texts, done = split(await collect(backend, chat(temperature=0, max_tokens=16)))
        assert done.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
        assert done.usage.completion_tokens == sum(len(c.token_ids) for c in texts) > 0
        again, _ = split(await collect(backend, chat(temperature=0, max_tokens=16)))
        assert [c.token_ids for c in again] == [c.token_ids for c in texts]  # greedy

        stream = backend.generate(chat(temperature=1.0, max_tokens=400, seed=1))
        assert isinstance(await stream.__anext__(), TextChunk)
        await stream.aclose()
        assert backend.active_generations() == 0
    finally:
        await backend.aclose()


async def test_a_model_configured_for_vllm_says_why_it_cannot_serve_here(
    tiny_model_dir: Path, config_for
) -> None:
    """Asked for vLLM explicitly, a model never falls back to another runner silently."""
    import grpc

    from pluggably.server import GatewayServer
    from pluggably.v1 import generation_pb2 as G
    from pluggably.v1 import (
        model_pb2,
        model_service_pb2,
        model_service_pb2_grpc,
        stream_service_pb2_grpc,
    )

    server = GatewayServer(
        config_for([{"name": "fast", "path": str(tiny_model_dir), "runner": "vllm"}])
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            models = model_service_pb2_grpc.ModelServiceStub(channel)
            model = await models.GetModel(model_service_pb2.GetModelRequest(id="local/fast"))
            assert model.state == model_pb2.MODEL_STATE_UNSERVABLE
            assert "vllm" in model.state_reason
            stream = stream_service_pb2_grpc.StreamServiceStub(channel)
            request = G.GenerateRequest(
                model="local/fast", messages=[G.ChatMessage(role="user", content="hi")]
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stream.StreamGenerate(request):
                    pass
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "vLLM" in caught.value.details()
    finally:
        await server.stop(grace=0)
