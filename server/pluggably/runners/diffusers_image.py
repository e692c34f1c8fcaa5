"""Local text-to-image with `diffusers` (provider `local`): any `DiffusionPipeline` folder.

Importing this module is cheap: `torch` and `diffusers` come with the first request, in a worker
thread. The pipeline is loaded from its folder (`local_files_only`), with the scheduler its
config names (Stable Diffusion, SDXL, ...), on CUDA when there is one, else on the CPU.

One generation at a time per pipeline: a pipeline object keeps per-call state (its scheduler's
timesteps, the interrupt flag), so concurrent requests wait in the model's admission queue (fair
across API keys, bounded, like the text runner). Each denoising step is reported as a
`ProgressChunk`; a cancelled request sets the pipeline's interrupt flag from the step callback,
so it stops within one step. The images are encoded (PNG, JPEG or WebP) in the same thread and
yielded as `ArtifactChunk`s, which the generation layer stores in the artifact store.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pluggably.core.errors import FieldViolation, InvalidArgument, ModelNotFound, Unavailable
from pluggably.core.params import ParameterSpec, parameters_for
from pluggably.core.types import (
    ArtifactChunk,
    Chunk,
    DoneChunk,
    FinishReason,
    GenerationRequest,
    ImageFormat,
    Modality,
    ModelInfo,
    ProgressChunk,
    Usage,
)
from pluggably.observability import metrics
from pluggably.runners.pipelines import PipelineBackend, PipelineSlot

log = logging.getLogger(__name__)

SUPPORTED_IMAGE_PARAMS = (
    "width",
    "height",
    "steps",
    "guidance_scale",
    "negative_prompt",
    "seed",
    "count",
    "format",
)
# What Stable Diffusion pipelines default to when the model says nothing.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
_LOAD_RETRY_AFTER_S = 30.0


@dataclass(frozen=True)
class LocalImageModel:
    """One diffusers pipeline folder served as `local/<name>`."""

    name: str
    path: Path
    device: str = "auto"
    dtype: str = "auto"
    max_queue: int = 16
    queue_timeout_s: float = 120.0
    description: str = ""
    default_steps: int | None = None


class _Slot(PipelineSlot[LocalImageModel]):
    def __init__(self, cfg: LocalImageModel, provider: str) -> None:
        super().__init__(cfg, provider)
        self.defaults: dict[str, Any] | None = None  # from the folder's configs


class DiffusersImageBackend(PipelineBackend[LocalImageModel, _Slot]):
    """Serves local text-to-image pipelines (see the module docstring)."""

    MODALITY = Modality.IMAGE

    def _new_slot(self, cfg: LocalImageModel) -> _Slot:
        return _Slot(cfg, self.provider)

    def parameters(self, model: ModelInfo) -> list[ParameterSpec]:
        slot = self._slots.get(model.name)
        defaults = self._defaults(slot) if slot is not None else {}
        return parameters_for(Modality.IMAGE, supported=SUPPORTED_IMAGE_PARAMS, **defaults)

    def _defaults(self, slot: _Slot) -> dict[str, Any]:
        """Width and height from the UNet's sample size and the VAE's scale; steps and
        guidance from the config, else Stable Diffusion's (read once, no torch needed)."""
        if slot.defaults is None:
            defaults: dict[str, Any] = {
                "steps": slot.cfg.default_steps or DEFAULT_STEPS,
                "guidance_scale": DEFAULT_GUIDANCE,
            }
            unet = _read_json(slot.cfg.path / "unet" / "config.json") or {}
            vae = _read_json(slot.cfg.path / "vae" / "config.json") or {}
            sample = unet.get("sample_size")
            blocks = vae.get("block_out_channels") or []
            if isinstance(sample, int) and blocks:
                side = sample * 2 ** (len(blocks) - 1)
                defaults["width"] = defaults["height"] = side
            slot.defaults = defaults
        return slot.defaults

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
            prompt = users[-1].content if users else ""
        if not prompt:
            raise InvalidArgument([FieldViolation("prompt", "an image model needs a prompt")])
        params = request.image
        defaults = self._defaults(slot)
        steps = params.steps or defaults["steps"]
        width = params.width or defaults.get("width")
        height = params.height or defaults.get("height")
        guidance = params.guidance_scale
        if guidance is None:
            guidance = defaults["guidance_scale"]
        count = params.count or 1
        image_format = params.format or ImageFormat.PNG

        async with slot.admission.admit():
            pipeline = await self._ensure_loaded(slot)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[Any] = asyncio.Queue()
            stop = threading.Event()

            def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> Any:
                # The scheduler's own count: some (PNDM) run more steps than were asked for.
                total = int(getattr(pipe, "num_timesteps", 0) or steps)
                loop.call_soon_threadsafe(
                    events.put_nowait,
                    ProgressChunk(
                        stage="denoising", step=step + 1, total_steps=max(total, step + 1)
                    ),
                )
                if stop.is_set():
                    pipe._interrupt = True
                return kwargs

            def run() -> tuple[list[bytes], bool]:
                import torch

                generator = None
                if params.seed is not None:
                    generator = torch.Generator(device="cpu").manual_seed(params.seed)
                with torch.inference_mode():
                    output = pipeline(
                        prompt=prompt,
                        negative_prompt=params.negative_prompt or None,
                        width=width,
                        height=height,
                        num_inference_steps=steps,
                        guidance_scale=guidance,
                        num_images_per_prompt=count,
                        generator=generator,
                        callback_on_step_end=on_step,
                        output_type="pil",
                    )
                interrupted = bool(getattr(pipeline, "_interrupt", False))
                return [_encode(image, image_format) for image in output.images], interrupted

            slot.busy = True
            started = time.perf_counter()
            task = asyncio.ensure_future(asyncio.to_thread(run))
            task.add_done_callback(lambda _task: events.put_nowait(None))
            try:
                while True:
                    event = await events.get()
                    if event is None:
                        break
                    yield event
                images, interrupted = await task
            finally:
                stop.set()  # a consumer that went away stops the pipeline at its next step
                if not task.done():
                    # Shielded: the thread cannot be interrupted mid-step; the slot stays
                    # busy (and the permit held) until it returns.
                    with contextlib.suppress(BaseException):
                        await asyncio.shield(task)
                slot.busy = False
            for data in images:
                yield ArtifactChunk(data=data, mime_type=image_format.mime_type, kind="image")
            log.debug(
                "%s: %d image(s), %d steps in %.2fs",
                slot.model_id,
                len(images),
                steps,
                time.perf_counter() - started,
            )
            yield DoneChunk(
                finish_reason=FinishReason.CANCELLED if interrupted else FinishReason.STOP,
                usage=Usage(steps=steps),
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
            log.info("loaded local image model %s on %s", slot.model_id, slot.device)
            return slot.pipeline

    async def aclose(self) -> None:
        self._closed = True
        for slot in self._slots.values():
            slot.pipeline = None


def _load(cfg: LocalImageModel) -> tuple[Any, Any]:
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
    pipeline = DiffusionPipeline.from_pretrained(str(cfg.path), local_files_only=True, dtype=dtype)
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, device


def _load_error(exc: BaseException) -> str:
    # The exception's type and its first line: no stack, no file-system layout beyond it.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _encode(image: Any, image_format: ImageFormat) -> bytes:
    buffer = io.BytesIO()
    if image_format is ImageFormat.JPEG:
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    elif image_format is ImageFormat.WEBP:
        image.save(buffer, format="WEBP", quality=95)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
