"""Text-to-3D: the marching-cubes tables, the offline tiny Shap-E pipeline, and the Shap-E runner
against it (GLB/OBJ/PLY files, reproducible seeds, step progress, cancellation, grid sizes,
errors)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pluggably.core.errors import FailedPrecondition, InvalidArgument, ModelNotFound, Unavailable
from pluggably.core.types import (
    ArtifactChunk,
    ChatMessage,
    Chunk,
    DoneChunk,
    FinishReason,
    GenerationRequest,
    MeshFormat,
    MeshParams,
    Modality,
    ModelState,
    ProgressChunk,
)
from pluggably.devtools.tiny_image import build_tiny_image_pipeline
from pluggably.devtools.tiny_mesh import (
    CUBE_EDGES,
    MAX_CUBE_TRIANGLES,
    PIPELINE_FILES,
    build_tiny_mesh_pipeline,
    is_complete,
    main,
    marching_cubes_tables,
)
from pluggably.runners.shap_e_mesh import LocalMeshModel, ShapEMeshBackend

pytest.importorskip("diffusers", reason="diffusers is not installed on this machine")
pytest.importorskip("trimesh", reason="trimesh is not installed on this machine")

PROMPT = "a red cat"


def request(model: str = "tiny", prompt: str | None = PROMPT, **mesh: Any) -> GenerationRequest:
    mesh.setdefault("steps", 2)
    mesh.setdefault("grid_size", 16)
    return GenerationRequest(request_id="test", model=model, prompt=prompt, mesh=MeshParams(**mesh))


async def collect(backend: ShapEMeshBackend, req: GenerationRequest) -> list[Chunk]:
    chunks = [c async for c in backend.generate(req)]
    assert isinstance(chunks[-1], DoneChunk)
    return chunks


async def mesh_bytes(backend: ShapEMeshBackend, req: GenerationRequest) -> bytes:
    (artifact,) = [c for c in await collect(backend, req) if isinstance(c, ArtifactChunk)]
    return artifact.data


def load_mesh(data: bytes, file_type: str) -> Any:
    import trimesh

    return trimesh.load(io.BytesIO(data), file_type=file_type, force="mesh", process=False)


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


async def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return bool(predicate())


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mesh_pipeline(tmp_path_factory.mktemp("meshes") / "tiny-shap-e")


def variant(src: Path, dst: Path, **renderer_tensors: Any) -> Path:
    """A copy of the pipeline whose renderer has the given tensors replaced (name -> function of
    the old tensor)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = dst / "shap_e_renderer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    for name, change in renderer_tensors.items():
        tensors[name] = change(tensors[name])
    save_file(tensors, weights)
    return dst


@pytest.fixture(scope="module")
async def backend(
    pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ShapEMeshBackend]:
    tmp = tmp_path_factory.mktemp("mesh-variants")
    no_tables = variant(
        pipeline_dir, tmp / "no-tables", **{"mesh_decoder.masks": lambda t: t & False}
    )
    # The signed distance is negative everywhere: no surface at all.
    hollow = variant(pipeline_dir, tmp / "hollow", **{"mlp.mlp.6.bias": lambda t: t - 100.0})
    image_pipeline = build_tiny_image_pipeline(tmp / "tiny-sd")
    b = ShapEMeshBackend(
        [
            LocalMeshModel("tiny", pipeline_dir, description="tiny", default_steps=3),
            LocalMeshModel("no-tables", no_tables),
            LocalMeshModel("hollow", hollow),
            LocalMeshModel("missing", tmp / "no-such-folder"),
            LocalMeshModel("text-to-image", image_pipeline),
        ]
    )
    yield b
    await b.aclose()


# ---- marching cubes ---------------------------------------------------------------------------


def test_every_case_is_triangulated_on_its_crossing_edges() -> None:
    table = marching_cubes_tables()
    assert len(table) == 256
    assert table[0] == [] and table[255] == []
    for case, triangles in enumerate(table):
        inside = [bool(case >> c & 1) for c in range(8)]
        crossing = {i for i, (a, b) in enumerate(CUBE_EDGES) if inside[a] != inside[b]}
        assert len(triangles) <= MAX_CUBE_TRIANGLES
        assert {e for t in triangles for e in t} == crossing, case
        assert all(len(set(t)) == 3 for t in triangles), case
    # One corner inside: one triangle on its three edges.
    assert sorted(table[1][0]) == [0, 4, 8]


def sphere_field(grid: int, radius: float) -> Any:
    import torch

    axis = torch.linspace(-1.0, 1.0, grid)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    return radius - torch.sqrt(x**2 + y**2 + z**2)  # positive inside, as Shap-E's field


def decode(field: Any) -> Any:
    """Marching cubes with diffusers' own `MeshDecoder` and the tables built here."""
    import torch
    import trimesh
    from diffusers.pipelines.shap_e.renderer import MeshDecoder

    from pluggably.devtools.tiny_mesh import marching_cubes_buffers

    decoder = MeshDecoder()
    decoder.cases, decoder.masks = marching_cubes_buffers()
    out = decoder(field, torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([2.0, 2.0, 2.0]))
    return trimesh.Trimesh(out.verts.numpy(), out.faces.numpy(), process=False)


def test_a_sphere_decodes_to_a_closed_outward_mesh() -> None:
    import math

    import numpy as np

    radius = 0.6
    mesh = decode(sphere_field(34, radius))
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.euler_number == 2  # one closed surface without holes
    # Outward normals give a positive volume, within 2% of the ball's.
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.02)
    distances = np.linalg.norm(mesh.vertices, axis=1)
    assert np.allclose(distances, radius, atol=2 / 33)  # within a grid step of the sphere
    assert 500 < len(mesh.vertices) < 5000


def test_noise_decodes_to_closed_meshes() -> None:
    """Noise is full of ambiguous faces: neighbouring cubes must still agree on each one."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        field = torch.randn(14, 14, 14, generator=generator)
        field[[0, -1]] = field[:, [0, -1]] = field[:, :, [0, -1]] = -1.0  # closed, like Shap-E
        mesh = decode(field)
        assert len(mesh.faces) > 1000
        assert mesh.is_watertight and mesh.is_winding_consistent
        assert mesh.volume > 0


# ---- the tiny pipeline ----------------------------------------------------------------------


def test_the_pipeline_loads_offline_in_a_fresh_process(pipeline_dir: Path) -> None:
    assert is_complete(pipeline_dir)
    assert set(PIPELINE_FILES) <= set(file_bytes(pipeline_dir))
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    assert index["_class_name"] == "ShapEPipeline"
    assert "noise" in (pipeline_dir / "README.md").read_text()
    script = (
        "import sys\n"
        "from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], local_files_only=True)\n"
        "print(type(pipe).__name__, int(pipe.shap_e_renderer.mesh_decoder.masks.sum()))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(pipeline_dir.parent / "hf")}
    done = subprocess.run(
        [sys.executable, "-c", script, str(pipeline_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "ShapEPipeline",
        str(sum(len(t) for t in marching_cubes_tables())),
    ]


def test_the_cli_builds_deterministically(pipeline_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    assert main([str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    assert file_bytes(out) == file_bytes(pipeline_dir)  # seed 0, byte for byte
    marker = out / "README.md"
    marker.write_text("kept")
    assert main([str(out)]) == 0  # complete: left alone
    assert marker.read_text() == "kept"
    assert main([str(out), "--force", "--seed", "1"]) == 0
    rebuilt = file_bytes(out)
    assert rebuilt.keys() == file_bytes(pipeline_dir).keys()
    weights = "prior/diffusion_pytorch_model.safetensors"
    assert rebuilt[weights] != file_bytes(pipeline_dir)[weights]


# ---- the runner -------------------------------------------------------------------------------


def test_importing_the_modules_stays_cheap() -> None:
    script = (
        "import sys\n"
        "import pluggably.runners.shap_e_mesh, pluggably.devtools.tiny_mesh\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'trimesh') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


async def test_catalogue_and_parameters(backend: ShapEMeshBackend) -> None:
    models = {m.name: m for m in await backend.list_models()}
    assert set(models) == {"tiny", "no-tables", "hollow", "missing", "text-to-image"}
    tiny = models["tiny"]
    assert tiny.id == "local/tiny" and tiny.modality is Modality.MESH
    assert tiny.description == "tiny" and tiny.state is ModelState.AVAILABLE
    specs = {s.name: s for s in backend.parameters(tiny)}
    assert set(specs) == {
        "mesh.steps",
        "mesh.guidance_scale",
        "mesh.seed",
        "mesh.grid_size",
        "mesh.format",
    }
    assert specs["mesh.steps"].default == 3  # the model's configured default
    assert (specs["mesh.grid_size"].minimum, specs["mesh.grid_size"].maximum) == (16, 256)
    assert specs["mesh.grid_size"].default == 128
    assert all(s.supported for s in specs.values())


@pytest.mark.parametrize(
    ("mesh_format", "mime_type"),
    [
        (MeshFormat.GLB, "model/gltf-binary"),
        (MeshFormat.OBJ, "model/obj"),
        (MeshFormat.PLY, "model/x-ply"),
    ],
)
async def test_each_format_is_a_valid_closed_mesh(
    backend: ShapEMeshBackend, mesh_format: MeshFormat, mime_type: str
) -> None:
    chunks = await collect(backend, request(seed=3, grid_size=24, format=mesh_format))
    (artifact,) = [c for c in chunks if isinstance(c, ArtifactChunk)]
    assert (artifact.mime_type, artifact.kind) == (mime_type, "mesh")
    mesh = load_mesh(artifact.data, mesh_format.value)
    assert len(mesh.faces) > 0
    assert mesh.is_watertight and mesh.volume > 0  # closed, normals outward
    assert mesh.visual.kind == "vertex" and len(mesh.visual.vertex_colors) == len(mesh.vertices)
    if mesh_format is MeshFormat.GLB:
        assert artifact.data[:4] == b"glTF"
    elif mesh_format is MeshFormat.PLY:
        assert artifact.data.startswith(b"ply\n")


async def test_the_three_formats_hold_the_same_mesh(backend: ShapEMeshBackend) -> None:
    import numpy as np

    meshes = [
        load_mesh(await mesh_bytes(backend, request(seed=4, format=f)), f.value) for f in MeshFormat
    ]
    counts = {(len(m.vertices), len(m.faces)) for m in meshes}
    assert len(counts) == 1
    bounds = [m.bounds for m in meshes]
    assert all(np.allclose(b, bounds[0], atol=1e-5) for b in bounds)


async def test_seeds_are_reproducible(backend: ShapEMeshBackend) -> None:
    first = await mesh_bytes(backend, request(seed=7))
    assert await mesh_bytes(backend, request(seed=7)) == first
    assert await mesh_bytes(backend, request(seed=8)) != first
    assert await mesh_bytes(backend, request(seed=7, prompt="a blue dog")) != first


async def test_progress_is_reported_per_step(backend: ShapEMeshBackend) -> None:
    chunks = await collect(backend, request(steps=5, seed=1))
    progress = [c for c in chunks if isinstance(c, ProgressChunk)]
    denoising = [(c.step, c.total_steps) for c in progress if c.stage == "denoising"]
    assert denoising == [(step, 5) for step in range(1, 6)]
    assert [c.stage for c in progress][-1] == "decoding"
    assert [type(c) for c in chunks[-2:]] == [ArtifactChunk, DoneChunk]
    done = chunks[-1]
    assert isinstance(done, DoneChunk)
    assert done.finish_reason is FinishReason.STOP and done.usage.steps == 5


async def test_defaults_and_guidance_without_classifier_free_guidance(
    backend: ShapEMeshBackend,
) -> None:
    chunks = await collect(backend, request(steps=None, seed=2, guidance_scale=0.0))
    done = chunks[-1]
    assert isinstance(done, DoneChunk) and done.usage.steps == 3  # the model's default_steps
    guided = await mesh_bytes(backend, request(steps=None, seed=2))
    (unguided,) = [c.data for c in chunks if isinstance(c, ArtifactChunk)]
    assert guided != unguided


async def test_a_chat_request_uses_the_last_user_message(backend: ShapEMeshBackend) -> None:
    chat = GenerationRequest(
        request_id="test",
        model="tiny",
        messages=(ChatMessage("user", "a blue dog"), ChatMessage("user", PROMPT)),
        mesh=MeshParams(steps=2, grid_size=16, seed=5),
    )
    assert await mesh_bytes(backend, chat) == await mesh_bytes(backend, request(seed=5))


async def test_a_finer_grid_gives_more_vertices(backend: ShapEMeshBackend) -> None:
    counts = []
    for grid_size in (16, 32):
        data = await mesh_bytes(
            backend, request(seed=6, grid_size=grid_size, format=MeshFormat.PLY)
        )
        counts.append(len(load_mesh(data, "ply").vertices))
    assert counts[1] > 2 * counts[0]


@pytest.fixture
async def prior_calls(backend: ShapEMeshBackend) -> AsyncIterator[list[int]]:
    """One entry per call of the tiny model's prior while the test runs."""
    await collect(backend, request(steps=1))  # loaded
    calls: list[int] = []
    hook = backend._slots["tiny"].pipeline.prior.register_forward_hook(lambda *_: calls.append(1))
    yield calls
    hook.remove()


async def test_closing_the_stream_stops_between_steps(
    backend: ShapEMeshBackend, prior_calls: list[int]
) -> None:
    calls = prior_calls
    stream = backend.generate(request(steps=500, seed=1))
    first = await stream.__anext__()
    assert isinstance(first, ProgressChunk) and first.step == 1
    await stream.aclose()  # returns once the thread has stopped
    assert not backend.in_use("tiny")
    stopped_at = len(calls)
    await asyncio.sleep(0.1)
    assert len(calls) == stopped_at < 20  # 500 Heun steps are 999 prior calls
    assert len(await mesh_bytes(backend, request(seed=1))) > 0  # the model serves again


async def test_cancelling_the_task_stops_the_decode(backend: ShapEMeshBackend) -> None:
    """A 128^3 grid takes the renderer's MLP 513 batches of 4096 points for the signed distance
    alone (seconds on a CPU); a cancel stops it at the next batch."""
    await collect(backend, request(steps=1))  # loaded
    batches: list[int] = []
    renderer = backend._slots["tiny"].pipeline.shap_e_renderer
    hook = renderer.mlp.register_forward_hook(lambda *_: batches.append(1))
    decoding = asyncio.Event()

    async def consume() -> None:
        async for chunk in backend.generate(request(steps=1, grid_size=128)):
            if isinstance(chunk, ProgressChunk) and chunk.stage == "decoding":
                decoding.set()

    try:
        task = asyncio.create_task(consume())
        await asyncio.wait_for(decoding.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await wait_until(lambda: not backend.in_use("tiny"))
        stopped_at = len(batches)
        await asyncio.sleep(0.1)
        assert len(batches) == stopped_at < 400
    finally:
        hook.remove()


async def test_aclose_ends_running_generations_as_cancelled(pipeline_dir: Path) -> None:
    b = ShapEMeshBackend([LocalMeshModel("tiny", pipeline_dir)])
    stream = b.generate(request(steps=500, seed=1))
    assert isinstance(await stream.__anext__(), ProgressChunk)
    await b.aclose()
    rest = [c async for c in stream]
    assert not any(isinstance(c, ArtifactChunk) for c in rest)
    done = rest[-1]
    assert isinstance(done, DoneChunk) and done.finish_reason is FinishReason.CANCELLED
    assert 1 <= done.usage.steps < 500
    with pytest.raises(Unavailable):
        await collect(b, request())
    assert not (await b.list_models())[0].loaded


async def test_unknown_model(backend: ShapEMeshBackend) -> None:
    with pytest.raises(ModelNotFound):
        await collect(backend, request(model="nope"))


@pytest.mark.parametrize(
    ("mesh", "field_name"),
    [
        ({"grid_size": 8}, "mesh.grid_size"),
        ({"grid_size": 257}, "mesh.grid_size"),
        ({"steps": 0}, "mesh.steps"),
        ({"steps": 501}, "mesh.steps"),
        ({"guidance_scale": 51.0}, "mesh.guidance_scale"),
        ({"guidance_scale": float("nan")}, "mesh.guidance_scale"),
    ],
)
async def test_out_of_range_options_are_invalid_arguments(
    backend: ShapEMeshBackend, mesh: dict[str, Any], field_name: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await collect(backend, request(**mesh))
    assert [v.field for v in caught.value.violations] == [field_name]


async def test_a_request_without_a_prompt_is_invalid(backend: ShapEMeshBackend) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await collect(backend, request(prompt=None))
    assert caught.value.violations[0].field == "prompt"


async def test_models_that_cannot_load(backend: ShapEMeshBackend) -> None:
    cases = (
        ("no-tables", "marching-cubes"),
        ("text-to-image", "not a Shap-E text-to-3D pipeline"),
        ("missing", ""),
    )
    for name, says in cases:
        with pytest.raises(Unavailable) as caught:
            await collect(backend, request(model=name))
        assert caught.value.reason == "MODEL_LOAD_FAILED"
        assert says in caught.value.message
        info = backend.describe(name)
        assert info is not None and info.state is ModelState.ERROR and info.state_reason


async def test_an_empty_surface_is_a_failed_precondition(backend: ShapEMeshBackend) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        await collect(backend, request(model="hollow"))
    assert caught.value.reason == "EMPTY_MESH"
    assert not backend.in_use("hollow")


async def test_a_mesh_model_serves_through_the_gateway(
    tmp_path_factory: pytest.TempPathFactory, config_for
) -> None:
    """local.models takes modality: mesh; the file is stored as an artifact."""
    import grpc

    from pluggably.devtools.tiny_mesh import build_tiny_mesh_pipeline
    from pluggably.server import GatewayServer
    from pluggably.v1 import generate_service_pb2_grpc
    from pluggably.v1 import generation_pb2 as G

    folder = await asyncio.to_thread(
        build_tiny_mesh_pipeline, tmp_path_factory.mktemp("gateway-mesh") / "shape"
    )
    server = GatewayServer(
        config_for([{"name": "shape", "path": str(folder), "modality": "mesh", "default_steps": 2}])
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = generate_service_pb2_grpc.GenerateServiceStub(channel)
            response = await stub.Generate(
                G.GenerateRequest(
                    model="local/shape",
                    prompt="a chair",
                    mesh=G.MeshOptions(grid_size=16, seed=1, inline_data=True),
                )
            )
            (artifact,) = response.artifacts
            assert (artifact.kind, artifact.mime_type) == ("mesh", "model/gltf-binary")
            assert artifact.inline_data[:4] == b"glTF"
            assert response.usage.steps == 2
    finally:
        await server.stop(grace=0)
