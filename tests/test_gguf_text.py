"""The GGUF text runner, against the tiny random Llama written as GGUF (CPU, offline).

The reference is the same tiny model served from its transformers folder by the text runner:
the F32 GGUF holds the very same weights, so every greedy (and seeded) generation must give the
same token ids and end the same way.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gguf", reason="the `gguf` package (GGUF reading and writing) is not installed")
pytest.importorskip("accelerate", reason="transformers needs `accelerate` to load GGUF files")

from pluggably.core.errors import FailedPrecondition, ModelNotFound, Unavailable
from pluggably.core.types import (
    ChatMessage,
    DoneChunk,
    FinishReason,
    GenerationRequest,
    Modality,
    ModelState,
    TextChunk,
    TextParams,
)
from pluggably.devtools.tiny_gguf import build_tiny_gguf, convert_llama_folder, main
from pluggably.runners import transformers_text
from pluggably.runners.gguf_text import GgufTextBackend, read_gguf_header
from pluggably.runners.transformers_text import (
    LocalTextModel,
    TransformersTextBackend,
)

HELLO = (ChatMessage("system", "You are a helpful robot."), ChatMessage("user", "Tell me a story."))


@pytest.fixture(scope="module")
def gguf_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gguf

    d = tmp_path_factory.mktemp("gguf")
    good = convert_llama_folder(tiny_model_dir, d / "tiny.gguf")
    convert_llama_folder(tiny_model_dir, d / "tiny-q8_0.gguf", tensor_type="q8_0")
    data = good.read_bytes()
    (d / "truncated.gguf").write_bytes(data[: len(data) * 2 // 3])
    (d / "garbage.gguf").write_bytes(b"PK\x03\x04 a zip file, say" * 8)
    shutil.copyfile(good, d / "tiny-00001-of-00002.gguf")
    # A sound file of an architecture transformers has no loader for.
    alien = gguf.GGUFWriter(d / "alien.gguf", "nosucharch")
    alien.add_context_length(64)
    alien.add_tensor("token_embd.weight", gguf.np.zeros((4, 4), dtype=gguf.np.float32))
    alien.write_header_to_file()
    alien.write_kv_data_to_file()
    alien.write_tensors_to_file()
    alien.close()
    # A GGUF next to another model's files, as in Hugging Face repos that ship both.
    mixed = d / "mixed"
    mixed.mkdir()
    shutil.copyfile(good, mixed / "tiny.gguf")
    (mixed / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
    (mixed / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1}')
    return d


@pytest.fixture(scope="module")
async def backend(gguf_dir: Path):
    b = GgufTextBackend(
        [
            LocalTextModel("tiny", gguf_dir / "tiny.gguf", max_concurrency=2, description="g"),
            LocalTextModel("q8", gguf_dir / "tiny-q8_0.gguf"),
            LocalTextModel("truncated", gguf_dir / "truncated.gguf"),
            LocalTextModel("garbage", gguf_dir / "garbage.gguf"),
            LocalTextModel("split", gguf_dir / "tiny-00001-of-00002.gguf"),
            LocalTextModel("alien", gguf_dir / "alien.gguf"),
            LocalTextModel("mixed", gguf_dir / "mixed" / "tiny.gguf"),
            LocalTextModel("missing", gguf_dir / "no-such-file.gguf"),
        ]
    )
    yield b
    await b.aclose()


@pytest.fixture(scope="module")
async def reference(tiny_model_dir: Path):
    b = TransformersTextBackend([LocalTextModel("tiny", tiny_model_dir)])
    yield b
    await b.aclose()


def request(
    model: str = "tiny",
    *,
    prompt: str | None = None,
    messages: tuple[ChatMessage, ...] = HELLO,
    ignore_eos: bool = False,
    **text: Any,
) -> GenerationRequest:
    return GenerationRequest(
        request_id="test",
        model=model,
        messages=() if prompt is not None else messages,
        prompt=prompt,
        text=TextParams(**text),
        provider_options={"ignore_eos": True} if ignore_eos else {},
    )


async def collect(backend: TransformersTextBackend, req: GenerationRequest):
    chunks = [c async for c in backend.generate(req)]
    assert chunks and isinstance(chunks[-1], DoneChunk)
    assert all(isinstance(c, TextChunk) for c in chunks[:-1])
    ids = [i for c in chunks[:-1] for i in c.token_ids]
    text = "".join(c.text for c in chunks[:-1])
    return text, ids, chunks[-1]


async def first(backend: TransformersTextBackend, req: GenerationRequest):
    agen = backend.generate(req)
    try:
        return await agen.__anext__()
    finally:
        await agen.aclose()


async def wait_until(predicate, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.005)
    return predicate()


# --- the file itself --------------------------------------------------------------------------


def test_module_import_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys, pluggably.runners.gguf_text, pluggably.devtools.tiny_gguf\n"
        "heavy = {'torch', 'transformers', 'gguf', 'numpy'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_tiny_gguf_loads_with_transformers(gguf_dir: Path, tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="tiny.gguf", local_files_only=True)
    for text in ("Once upon a time, é 東京 🙂", "  two  spaces\n\nand a newline", "<|eot_id|>x"):
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
    chat = [{"role": m.role, "content": m.content} for m in HELLO]
    assert tok.apply_chat_template(
        chat, add_generation_prompt=True, return_dict=False
    ) == ref_tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|pad|>",
    )

    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file="tiny.gguf", local_files_only=True, dtype=torch.float32
    )
    ref = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, local_files_only=True, dtype=torch.float32
    )
    got, want = model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    # F32 in, F32 out, and the query/key permutation undone exactly: bit-identical weights.
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_header(gguf_dir: Path) -> None:
    header = read_gguf_header(gguf_dir / "tiny.gguf")
    assert header.architecture == "llama"
    assert header.context_length == 512
    assert header.eog_ids == {4}  # EOS and EOT are both <|eot_id|>
    assert read_gguf_header(gguf_dir / "alien.gguf").context_length == 64


def test_build_is_deterministic_and_matches_the_conversion(
    gguf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "built.gguf"
    assert main([str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    # Same seed, same tiny model, same bytes as converting the session's model folder.
    assert out.read_bytes() == (gguf_dir / "tiny.gguf").read_bytes()
    mtime = out.stat().st_mtime_ns
    assert main([str(out)]) == 0 and out.stat().st_mtime_ns == mtime  # kept without --force
    other = build_tiny_gguf(tmp_path / "seed1.gguf", seed=1)
    assert other.read_bytes() != out.read_bytes()


# --- catalogue ----------------------------------------------------------------------------------


async def test_list_models(backend: GgufTextBackend, gguf_dir: Path) -> None:
    models = {m.name: m for m in await backend.list_models()}
    tiny = models["tiny"]
    assert tiny.id == "local/tiny" and tiny.modality is Modality.TEXT
    assert tiny.state is ModelState.AVAILABLE and tiny.state_reason == ""
    assert tiny.context_length == 512 and tiny.description == "g"
    assert tiny.size_bytes == (gguf_dir / "tiny.gguf").stat().st_size
    for name, reason in (
        ("truncated", "corrupt (truncated"),
        ("garbage", "corrupt (not a GGUF file (bad magic))"),
        ("split", "split GGUF file (00002 parts)"),
        ("missing", "the GGUF file is missing"),
    ):
        assert models[name].state is ModelState.ERROR, name
        assert reason in models[name].state_reason, models[name].state_reason
        assert str(gguf_dir) not in models[name].state_reason
    # Its header is sound: only loading finds out that transformers cannot read it.
    assert models["alien"].state is ModelState.AVAILABLE


# --- generation matches the transformers model ---------------------------------------------------


async def test_greedy_ids_match_the_transformers_model(
    backend: GgufTextBackend, reference: TransformersTextBackend
) -> None:
    for kwargs in (
        dict(messages=HELLO),
        dict(prompt="Once upon a time there was a little robot"),
    ):
        want_text, want, want_done = await collect(
            reference, request(max_tokens=24, temperature=0, ignore_eos=True, **kwargs)
        )
        text, ids, done = await collect(
            backend, request(max_tokens=24, temperature=0, ignore_eos=True, **kwargs)
        )
        assert ids == want and len(ids) == 24
        assert text == want_text
        assert done == want_done


async def test_end_of_generation_tokens_match_the_transformers_model(
    backend: GgufTextBackend, reference: TransformersTextBackend
) -> None:
    # The GGUF states one EOS id (<|eot_id|>); <|end_of_text|> must end generation too, as it
    # does for the original model (generation_config eos_token_id [1, 4]) and in llama.cpp.
    # Seeded sampling from the random model emits one of them now and then.
    ended_by = set()
    for seed in range(40):
        req = request(prompt="Once upon a time", max_tokens=300, seed=seed)
        _, want, want_done = await collect(reference, req)
        _, ids, done = await collect(backend, req)
        assert (ids, done) == (want, want_done), seed
        if done.finish_reason is FinishReason.STOP:
            ended_by.add(ids[-1])
            if ended_by == {1, 4}:
                break
    assert ended_by, "no seed ended with an end-of-sequence token"
    assert ended_by <= {1, 4}


async def test_token_texts_the_model_has_no_embedding_for_are_plain_text(
    backend: GgufTextBackend, reference: TransformersTextBackend
) -> None:
    # transformers' GGUF tokenizer adds GPT-2's <|endoftext|> past the vocabulary (id 949 of a
    # 949-row embedding): encoded as that token, this prompt would crash the model.
    req = request(
        prompt="hi <|endoftext|> there <|eot_id|>", max_tokens=6, temperature=0, ignore_eos=True
    )
    want = await collect(reference, req)
    got = await collect(backend, req)
    assert got[1:] == want[1:]
    assert got[2].usage.prompt_tokens > 10  # typed as text: many byte-level tokens


async def test_files_next_to_the_gguf_are_ignored(
    backend: GgufTextBackend, reference: TransformersTextBackend
) -> None:
    _, want, _ = await collect(reference, request(max_tokens=10, temperature=0, ignore_eos=True))
    _, ids, done = await collect(
        backend, request("mixed", max_tokens=10, temperature=0, ignore_eos=True)
    )
    assert ids == want and done.usage.prompt_tokens > 10


async def test_quantized_file_generates(backend: GgufTextBackend) -> None:
    # Q8_0 is dequantized on load; rounding may change a random model's near-ties, so only the
    # shape of the output is compared.
    _, ids, done = await collect(backend, request("q8", max_tokens=12, seed=1, ignore_eos=True))
    assert len(ids) == 12 and done.finish_reason is FinishReason.LENGTH
    assert all(0 <= i < 949 for i in ids)


# --- streaming, stop sequences, cancellation (the text runner's machinery) -----------------------


async def test_streams_chunks_then_one_done_chunk(backend: GgufTextBackend) -> None:
    chunks = []
    async for chunk in backend.generate(request(max_tokens=60, ignore_eos=True, seed=5)):
        chunks.append(chunk)
        await asyncio.sleep(0.01)  # a slow consumer gets several tokens per chunk
    assert isinstance(chunks[-1], DoneChunk)
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert all(isinstance(c, TextChunk) for c in chunks[:-1]) and len(chunks) > 2
    assert sum(len(c.token_ids) for c in chunks[:-1]) == 60 == chunks[-1].usage.completion_tokens
    assert max(len(c.token_ids) for c in chunks[:-1]) > 1


async def test_stop_sequence(backend: GgufTextBackend) -> None:
    params: dict[str, Any] = dict(max_tokens=80, seed=21, ignore_eos=True)
    full_text, full_ids, _ = await collect(backend, request(**params))
    stop = None
    for start in range(len(full_text) // 3, len(full_text) - 4):
        candidate = full_text[start : start + 3]
        if "\ufffd" not in candidate and candidate.strip() and full_text.find(candidate) > 0:
            stop = candidate
            break
    assert stop is not None, full_text
    text, ids, done = await collect(backend, request(stop=("never-appears", stop), **params))
    assert done.finish_reason is FinishReason.STOP and done.stop_sequence == stop
    assert text == full_text[: full_text.find(stop)]
    assert done.usage.completion_tokens == len(ids) < 80
    assert ids == full_ids[: len(ids)]


async def test_closing_the_stream_stops_the_thread(backend: GgufTextBackend) -> None:
    # Threads of earlier tests end within a token of their stream's end, not at once.
    assert await wait_until(lambda: backend.active_generations() == 0)
    agen = backend.generate(request(max_tokens=450, ignore_eos=True, seed=2))
    assert isinstance(await agen.__anext__(), TextChunk)
    (job,) = backend._jobs
    await agen.aclose()
    assert await wait_until(lambda: not job.thread.is_alive(), timeout=1.0)
    generated = job.generated
    await asyncio.sleep(0.1)
    assert job.generated == generated < 450
    assert await wait_until(lambda: backend.active_generations() == 0)


async def test_cancelling_the_task_stops_the_thread(backend: GgufTextBackend) -> None:
    assert await wait_until(lambda: backend.active_generations() == 0)
    first_chunk = asyncio.Event()

    async def consume() -> None:
        async for _ in backend.generate(request(max_tokens=450, ignore_eos=True, seed=3)):
            first_chunk.set()
            await asyncio.sleep(0.05)

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_chunk.wait(), 10)
    (job,) = backend._jobs
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_until(lambda: not job.thread.is_alive(), timeout=1.0)
    assert job.generated < 450
    assert await wait_until(lambda: backend.active_generations() == 0)


# --- files that cannot be served ----------------------------------------------------------------


async def test_corrupt_files_are_unavailable_with_the_reason(
    backend: GgufTextBackend, gguf_dir: Path
) -> None:
    for name, detail, reason in (
        ("truncated", "corrupt (truncated", "MODEL_FILE_CORRUPT"),
        ("garbage", "corrupt (not a GGUF file (bad magic))", "MODEL_FILE_CORRUPT"),
        ("missing", "missing", "MODEL_FILE_MISSING"),
    ):
        for _attempt in range(2):  # the same answer again, not a generic load failure
            with pytest.raises(Unavailable) as e:
                await first(backend, request(name, max_tokens=2))
            assert e.value.reason == reason
            assert f"local/{name}" in e.value.message and detail in e.value.message
            assert str(gguf_dir) not in e.value.message
    assert backend.active_generations() == 0


async def test_unservable_files_are_failed_preconditions(backend: GgufTextBackend) -> None:
    for name, detail in (
        ("split", "split GGUF file"),
        ("alien", "architecture 'nosucharch'"),
    ):
        for _attempt in range(2):
            with pytest.raises(FailedPrecondition) as e:
                await first(backend, request(name, max_tokens=2))
            assert e.value.reason == "MODEL_UNSERVABLE"
            assert detail in e.value.message, e.value.message
    alien = await backend.get_model("alien")
    assert alien is not None and alien.state is ModelState.ERROR
    assert "nosucharch" in alien.state_reason


async def test_a_fixed_file_serves_after_the_back_off(
    gguf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "fixme.gguf"
    shutil.copyfile(gguf_dir / "truncated.gguf", path)
    b = GgufTextBackend([LocalTextModel("fixme", path)])
    try:
        with pytest.raises(Unavailable):
            await first(b, request("fixme", max_tokens=2))
        shutil.copyfile(gguf_dir / "tiny.gguf", path)
        with pytest.raises(Unavailable):  # still within the back-off: not read again
            await first(b, request("fixme", max_tokens=2))
        monkeypatch.setattr(transformers_text, "_LOAD_RETRY_AFTER_S", 0.0)
        _, ids, _ = await collect(b, request("fixme", max_tokens=3, ignore_eos=True))
        assert len(ids) == 3
        assert (await b.get_model("fixme")).state is ModelState.AVAILABLE  # type: ignore[union-attr]
    finally:
        await b.aclose()


async def test_unknown_model(backend: GgufTextBackend) -> None:
    with pytest.raises(ModelNotFound):
        await first(backend, request("nope"))


async def test_a_gguf_file_found_on_disk_serves_through_the_gateway(
    gguf_dir: Path, tmp_path: Path, config_for
) -> None:
    """Discovery finds the file, the local backend routes it to the GGUF runner."""
    import shutil

    import grpc

    from pluggably.server import GatewayServer
    from pluggably.v1 import generation_pb2 as G
    from pluggably.v1 import (
        model_pb2,
        model_service_pb2,
        model_service_pb2_grpc,
        stream_service_pb2_grpc,
    )

    folder = tmp_path / "models"
    await asyncio.to_thread(folder.mkdir)
    await asyncio.to_thread(shutil.copy, gguf_dir / "tiny.gguf", folder / "tiny.gguf")
    server = GatewayServer(
        config_for(
            [],
            storage={
                "root": str(tmp_path / "storage"),
                "model_folders": [str(folder)],
                "scan_hf_cache": False,
                "rescan_interval_s": 0,
            },
        )
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            models = model_service_pb2_grpc.ModelServiceStub(channel)
            await models.RescanModels(model_service_pb2.RescanModelsRequest())
            model = await models.GetModel(model_service_pb2.GetModelRequest(id="local/tiny.gguf"))
            assert model.format == model_pb2.MODEL_FORMAT_GGUF
            assert model.state == model_pb2.MODEL_STATE_AVAILABLE, model.state_reason
            stream = stream_service_pb2_grpc.StreamServiceStub(channel)
            request = G.GenerateRequest(
                model="local/tiny.gguf",
                messages=[G.ChatMessage(role="user", content="hi")],
                text=G.TextOptions(max_tokens=4, temperature=0),
            )
            request.provider_options["ignore_eos"].bool_value = True
            chunks = [c async for c in stream.StreamGenerate(request)]
            assert chunks[-1].done.usage.completion_tokens == 4
    finally:
        await server.stop(grace=0)
