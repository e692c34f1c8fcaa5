"""Local text-to-3D with diffusers' Shap-E pipeline (provider `local`): a prompt in, a mesh file out.

Importing this module is cheap: `torch`, `diffusers` and `trimesh` come with the first request,
in a worker thread. The pipeline is loaded from its folder (`local_files_only`), on CUDA when
there is one (in float16, as Shap-E is usually run), else on the CPU.

How a generation runs:

- The prior denoises the latent (`output_type="latent"`); the renderer then decodes it with
  `decode_to_mesh(latent, device, grid_size)` (marching cubes over a `grid_size`^3 grid of the
  signed distance it predicts, then a colour per vertex). The pipeline's own `output_type="mesh"`
  cannot take a grid size, and its image outputs render views, not files.
- `ShapEPipeline` has no step callback. Its loop iterates `self.progress_bar(timesteps)`, so for
  the call that method is replaced on the instance by a generator that reports each step and
  ends the loop early when the request is cancelled. Heun (Shap-E's scheduler) makes two model
  calls per step and one for the last: a step counts as done when the scheduler is back in its
  first-order state, or at the last timestep, so the steps reported are the steps asked for.
  Cancellation during the mesh decode (long at large grids) is checked before every batch the
  renderer's MLP evaluates, by a forward pre-hook.
- The mesh becomes a `trimesh.Trimesh` and is exported as GLB (`model/gltf-binary`), OBJ
  (`model/obj`) or PLY (`model/x-ply`: PLY has no registered media type; this is the one content
  sniffers report). Shap-E decodes Z-up; files are written Y-up (glTF's convention, and what OBJ
  importers assume). Vertex colours stay linear in GLB, as glTF defines them, and are written
  as sRGB in OBJ and PLY, whose readers show them as stored.
- One generation at a time per pipeline: the renderer's MLP weights are overwritten by every
  decode and the scheduler keeps per-call state, so concurrent requests wait in the model's
  admission queue (fair across API keys, bounded), as for images.

The request's options are `GenerationRequest.mesh`; the dataplane range-checks them first, and
the runner checks them again: a grid size out of range would allocate gigabytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import warnings
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pluggably.core.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    ModelNotFound,
    PluggablyError,
    Unavailable,
)
from pluggably.core.params import ParameterSpec, parameters_for, validate_mesh_params
from pluggably.core.types import (
    ArtifactChunk,
    Chunk,
    DoneChunk,
    FinishReason,
    GenerationRequest,
    MeshFormat,
    Modality,
    ModelInfo,
    ProgressChunk,
    Usage,
)
from pluggably.observability import metrics
from pluggably.runners.pipelines import PipelineBackend, PipelineSlot

log = logging.getLogger(__name__)


DEFAULT_GRID_SIZE = 128
# What diffusers' own Shap-E example runs (the pipeline's defaults, 25 steps at 4.0, are weaker).
DEFAULT_STEPS = 64
DEFAULT_GUIDANCE = 15.0
SUPPORTED_MESH_PARAMS = ("steps", "guidance_scale", "seed", "grid_size", "format")

_LOAD_RETRY_AFTER_S = 30.0
# How long `aclose` waits for running generations to reach their next step.
_CLOSE_WAIT_S = 10.0


@dataclass(frozen=True)
class LocalMeshModel:
    """One Shap-E pipeline folder served as `local/<name>`."""

    name: str
    path: Path
    device: str = "auto"
    dtype: str = "auto"
    max_queue: int = 16
    queue_timeout_s: float = 120.0
    description: str = ""
    default_steps: int | None = None


_Slot = PipelineSlot[LocalMeshModel]


@dataclass
class _Outcome:
    data: bytes | None  # None: stopped before the mesh was made
    steps_done: int


class _Stopped(Exception):
    """Raised inside the renderer to abandon a decode that nobody waits for any more."""


class _EmptyMesh(Exception):
    """The decoded signed distance has no inside: there is no surface to export."""


class ShapEMeshBackend(PipelineBackend[LocalMeshModel, _Slot]):
    """Serves local text-to-3D pipelines (see the module docstring)."""

    MODALITY = Modality.MESH

    def __init__(self, models: Sequence[LocalMeshModel] = (), provider: str = "local") -> None:
        super().__init__(tuple(models), provider)
        # Running generations: their stop flags and threads, for `aclose`.
        self._stops: set[threading.Event] = set()
        self._threads: set[asyncio.Future[_Outcome]] = set()

    def _new_slot(self, cfg: LocalMeshModel) -> _Slot:
        return PipelineSlot(cfg, self.provider)

    def parameters(self, model: ModelInfo) -> list[ParameterSpec]:
        slot = self._slots.get(model.name)
        steps = (slot.cfg.default_steps if slot is not None else None) or DEFAULT_STEPS
        return parameters_for(
            Modality.MESH,
            supported=SUPPORTED_MESH_PARAMS,
            steps=steps,
            guidance_scale=DEFAULT_GUIDANCE,
            grid_size=DEFAULT_GRID_SIZE,
        )

    # ---- generation ----------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        slot = self._slots.get(request.model)
        if slot is None:
            raise ModelNotFound(f"{self.provider}/{request.model}")
        if self._closed:
            raise Unavailable("the local backend is shutting down", reason="BACKEND_SHUTTING_DOWN")
        prompt = request.prompt
        if prompt is None:
            users = [m for m in request.messages if m.role == "user"]
            prompt = users[-1].text() if users else ""
        if not prompt:
            raise InvalidArgument([FieldViolation("prompt", "a 3D model needs a prompt")])
        params = request.mesh
        violations = validate_mesh_params(params)
        if violations:
            raise InvalidArgument(violations)
        steps = params.steps or slot.cfg.default_steps or DEFAULT_STEPS
        guidance = DEFAULT_GUIDANCE if params.guidance_scale is None else params.guidance_scale
        grid_size = params.grid_size or DEFAULT_GRID_SIZE
        mesh_format = params.format or MeshFormat.GLB

        async with slot.admission.admit():
            pipeline = await self._ensure_loaded(slot)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[ProgressChunk | None] = asyncio.Queue()
            stop = threading.Event()

            def emit(chunk: ProgressChunk) -> None:
                loop.call_soon_threadsafe(events.put_nowait, chunk)

            def run() -> _Outcome:
                return _generate(
                    pipeline,
                    slot.device,
                    prompt=prompt,
                    steps=steps,
                    guidance=guidance,
                    seed=params.seed,
                    grid_size=grid_size,
                    mesh_format=mesh_format,
                    stop=stop,
                    emit=emit,
                )

            slot.busy = True
            self._stops.add(stop)
            started = time.perf_counter()
            task = asyncio.ensure_future(asyncio.to_thread(run))
            self._threads.add(task)
            task.add_done_callback(lambda _task: events.put_nowait(None))
            try:
                while True:
                    event = await events.get()
                    if event is None:
                        break
                    yield event
                outcome = await task
            except _EmptyMesh:
                raise FailedPrecondition(
                    f"model {slot.model_id} made no surface for this prompt and seed (the mesh "
                    "is empty); try another seed or prompt",
                    reason="EMPTY_MESH",
                ) from None
            except PluggablyError:
                raise
            except Exception as exc:
                # The exception's text may hold paths or tensor dumps: the log has it, the
                # client gets its type.
                log.exception("generation on %s failed", slot.model_id)
                raise Unavailable(
                    f"model {slot.model_id} failed to generate ({type(exc).__name__})",
                    reason="GENERATION_FAILED",
                ) from None
            finally:
                stop.set()  # a consumer that went away stops the pipeline at its next step
                if not task.done():
                    # Shielded: the thread cannot be interrupted mid-step; the slot stays
                    # busy (and the permit held) until it returns.
                    with contextlib.suppress(BaseException):
                        await asyncio.shield(task)
                self._stops.discard(stop)
                self._threads.discard(task)
                slot.busy = False
            if outcome.data is not None:
                yield ArtifactChunk(data=outcome.data, mime_type=mesh_format.mime_type, kind="mesh")
            log.debug(
                "%s: %s mesh, %d steps, grid %d in %.2fs",
                slot.model_id,
                mesh_format.value,
                outcome.steps_done,
                grid_size,
                time.perf_counter() - started,
            )
            yield DoneChunk(
                finish_reason=FinishReason.STOP
                if outcome.data is not None
                else FinishReason.CANCELLED,
                usage=Usage(steps=outcome.steps_done),
            )

    async def _ensure_loaded(self, slot: _Slot) -> Any:
        if slot.pipeline is not None:
            return slot.pipeline
        async with slot.load_lock:
            if slot.pipeline is not None:
                return slot.pipeline
            if slot.load_error and time.monotonic() - slot.load_failed_at < _LOAD_RETRY_AFTER_S:
                raise Unavailable(
                    f"model {slot.model_id} failed to load: {slot.load_error}",
                    retry_after_s=_LOAD_RETRY_AFTER_S,
                    reason="MODEL_LOAD_FAILED",
                )
            started = time.perf_counter()
            try:
                slot.pipeline, slot.device = await asyncio.to_thread(_load, slot.cfg)
            except Exception as exc:
                slot.load_error = _load_error(exc)
                slot.load_failed_at = time.monotonic()
                log.warning("loading %s failed: %s", slot.model_id, slot.load_error)
                raise Unavailable(
                    f"model {slot.model_id} failed to load: {slot.load_error}",
                    retry_after_s=_LOAD_RETRY_AFTER_S,
                    reason="MODEL_LOAD_FAILED",
                ) from None
            slot.load_error = ""
            metrics.observe_model_load(slot.model_id, time.perf_counter() - started)
            log.info("loaded local 3D model %s on %s", slot.model_id, slot.device)
            return slot.pipeline

    async def aclose(self) -> None:
        """Stops running generations at their next step (they end CANCELLED), waits for their
        threads a little, and releases the pipelines."""
        self._closed = True
        for stop in self._stops:
            stop.set()
        if self._threads:
            await asyncio.wait(set(self._threads), timeout=_CLOSE_WAIT_S)
        for slot in self._slots.values():
            slot.pipeline = None


@contextlib.contextmanager
def numpy_copy_warning_ignored() -> Iterator[None]:
    """Silences the one warning diffusers' Heun scheduler raises on every `set_timesteps` here:
    numpy 2.4's `np.array(tensor)` asks torch 2.13's `Tensor.__array__` for `copy=`, which it
    does not take, and numpy falls back to copying (the result is right). Only that message is
    ignored. `catch_warnings` swaps the process-wide filters: a thread running beside this block
    sees the same narrow filter, never a wider one."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"__array__ implementation doesn't accept a copy keyword",
            category=DeprecationWarning,
        )
        yield


# ---- in the worker thread -----------------------------------------------------------------


def _load(cfg: LocalMeshModel) -> tuple[Any, Any]:
    import torch
    from diffusers import DiffusionPipeline

    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    dtype: Any = torch.float32
    if cfg.dtype in ("float16", "bfloat16"):
        dtype = getattr(torch, cfg.dtype)
    elif cfg.dtype == "auto" and device.type == "cuda":
        dtype = torch.float16
    with numpy_copy_warning_ignored():  # the scheduler is built from its config
        pipeline = DiffusionPipeline.from_pretrained(
            str(cfg.path), local_files_only=True, dtype=dtype
        )
    renderer: Any = getattr(pipeline, "shap_e_renderer", None)
    parts = (renderer, getattr(pipeline, "prior", None), getattr(pipeline, "text_encoder", None))
    if any(part is None for part in parts):
        # ShapEImg2ImgPipeline has the same renderer but takes an image, not a prompt.
        raise ValueError(f"{type(pipeline).__name__} is not a Shap-E text-to-3D pipeline")
    if not bool(renderer.mesh_decoder.masks.any()):
        # A renderer saved straight after construction: every mesh would come out empty.
        raise ValueError("the renderer has no marching-cubes tables")
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, device


def _generate(
    pipeline: Any,
    device: Any,
    *,
    prompt: str,
    steps: int,
    guidance: float,
    seed: int | None,
    grid_size: int,
    mesh_format: MeshFormat,
    stop: threading.Event,
    emit: Callable[[ProgressChunk], None],
) -> _Outcome:
    import torch

    done = 0

    def on_step(step: int) -> None:
        nonlocal done
        done = step
        emit(ProgressChunk(stage="denoising", step=step, total_steps=steps))

    generator = None
    if seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    pipeline.progress_bar = _step_reporter(pipeline.scheduler, stop, on_step)
    try:
        with numpy_copy_warning_ignored():
            output = pipeline(
                prompt=prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generator,
                output_type="latent",
            )
    finally:
        del pipeline.progress_bar  # the class's own method again
    if stop.is_set():
        return _Outcome(None, done)

    emit(ProgressChunk(stage="decoding", step=0, total_steps=1))
    renderer = pipeline.shap_e_renderer

    def check_stop(_module: Any, _args: Any) -> None:
        if stop.is_set():
            raise _Stopped

    def check_surface(_module: Any, _args: Any, mesh: Any) -> None:
        # Caught here: diffusers fails on an empty mesh with an obscure `torch.cat` error.
        if len(mesh.faces) == 0:
            raise _EmptyMesh

    hooks = [
        renderer.mlp.register_forward_pre_hook(check_stop),
        renderer.mesh_decoder.register_forward_hook(check_surface),
    ]
    try:
        mesh = renderer.decode_to_mesh(output.images[0][None], device, grid_size=grid_size)
    except _Stopped:
        return _Outcome(None, done)
    finally:
        for hook in hooks:
            hook.remove()
    return _Outcome(_export(mesh, mesh_format), done)


def _step_reporter(
    scheduler: Any, stop: threading.Event, on_step: Callable[[int], None]
) -> Callable[..., Iterator[Any]]:
    """A stand-in for the pipeline's `progress_bar` (see the module docstring)."""

    def progress_bar(
        iterable: Iterable[Any] | None = None, total: int | None = None
    ) -> Iterator[Any]:
        timesteps = list(iterable) if iterable is not None else []
        done = 0
        for index, timestep in enumerate(timesteps):
            if stop.is_set():
                return
            yield timestep
            if getattr(scheduler, "state_in_first_order", True) or index == len(timesteps) - 1:
                done += 1
                on_step(done)

    return progress_bar


def _export(mesh: Any, mesh_format: MeshFormat) -> bytes:
    import numpy as np
    import trimesh

    vertices = mesh.verts.detach().float().cpu().numpy()
    # Z-up to Y-up, a rotation (x, y, z) -> (x, z, -y): the faces keep their orientation.
    vertices = np.stack([vertices[:, 0], vertices[:, 2], -vertices[:, 1]], axis=1)
    faces = mesh.faces.detach().cpu().numpy()
    colours = None
    channels = mesh.vertex_channels or {}
    if all(name in channels for name in "RGB"):
        linear = np.stack([channels[name].detach().float().cpu().numpy() for name in "RGB"], 1)
        rgb = linear if mesh_format is MeshFormat.GLB else _linear_to_srgb(linear)
        colours = np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    # process=False: the decoder already shares each vertex between its faces; merging by
    # position could join distinct vertices and break the mesh's topology.
    shape = trimesh.Trimesh(vertices=vertices, faces=faces, vertex_colors=colours, process=False)
    data = shape.export(file_type=mesh_format.value)
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def _linear_to_srgb(linear: Any) -> Any:
    import numpy as np

    linear = np.clip(linear, 0.0, 1.0)
    return np.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear ** (1 / 2.4) - 0.055)


def _load_error(exc: BaseException) -> str:
    # The exception's type and its first line: no stack, no file-system layout beyond it.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
