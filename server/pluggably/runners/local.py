"""The `local` backend: every model Pluggably runs itself, dispatched to a runner by its format.

Models come from two places, shown side by side: the config file (`local.models`, read at start,
never written anywhere) and the registry (`catalog/registry.py`: downloads and models found on
disk). A config entry wins over a registry row of the same name. Config models are the
operator's own files: never evicted, never deleted through the API.

The backend asks the registry on every call, so a download that finished or a rescan that found
a model serves without a restart. A model whose format no runner here serves is listed as
UNSERVABLE with the reason; asking it to generate is FAILED_PRECONDITION with that reason.
Today the runner is `transformers` for text; image and 3D runners plug in by format (issue 8).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pluggably.core.backend import Backend
from pluggably.core.errors import FailedPrecondition, ModelNotFound, Unavailable
from pluggably.core.params import NO_PROVIDER_OPTIONS, ProviderOptionsPolicy
from pluggably.core.types import (
    Chunk,
    GenerationRequest,
    LocalDetails,
    Modality,
    ModelFormat,
    ModelInfo,
    ModelSource,
    ModelState,
)
from pluggably.runners.diffusers_image import DiffusersImageBackend, LocalImageModel
from pluggably.runners.gguf_text import GgufTextBackend
from pluggably.runners.shap_e_mesh import LocalMeshModel, ShapEMeshBackend
from pluggably.runners.transformers_text import LocalTextModel, TransformersTextBackend
from pluggably.runners.vllm_text import LocalVllmModel, VllmTextBackend

if TYPE_CHECKING:
    from pluggably.catalog.registry import ModelRecord, ModelRegistry
    from pluggably.core.params import ParameterSpec
    from pluggably.runners.config import LocalModelConfig, WorkersConfig
    from pluggably.runners.pool import WorkerPool

log = logging.getLogger(__name__)

# Settings of a config entry that the text runner takes.
_TEXT_SETTINGS = (
    "device",
    "dtype",
    "max_concurrency",
    "max_queue",
    "queue_timeout_s",
    "default_max_tokens",
    "context_length",
    "description",
)
# Settings of a config entry that the image runner takes.
_IMAGE_SETTINGS = (
    "device",
    "dtype",
    "max_queue",
    "queue_timeout_s",
    "description",
    "default_steps",
)
# Settings of a config entry that vLLM takes, and the config's dtype names in vLLM's words.
_VLLM_SETTINGS = (
    "dtype",
    "max_concurrency",
    "max_queue",
    "queue_timeout_s",
    "default_max_tokens",
    "description",
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "max_model_len",
)
_VLLM_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "auto": "auto"}
# Why a model in a state other than AVAILABLE cannot generate: (error class, reason).
_NOT_READY = {
    ModelState.DOWNLOADING: (Unavailable, "MODEL_DOWNLOADING"),
    ModelState.DELETING: (Unavailable, "MODEL_DELETING"),
    ModelState.ERROR: (Unavailable, "MODEL_ERROR"),
    ModelState.NOT_DOWNLOADED: (Unavailable, "MODEL_NOT_DOWNLOADED"),
    ModelState.UNSERVABLE: (FailedPrecondition, "MODEL_UNSERVABLE"),
    ModelState.UNAVAILABLE: (Unavailable, "MODEL_UNAVAILABLE"),
}


class LocalBackend(Backend):
    """Serves config models and registry models (see the module docstring)."""

    def __init__(
        self,
        config_models: Sequence[LocalModelConfig] = (),
        *,
        registry: ModelRegistry | None = None,
        provider: str = "local",
        workers: WorkersConfig | None = None,
    ) -> None:
        self.provider = provider
        self.registry = registry
        self._configured = {m.name: _config_entry(m) for m in config_models}
        # Describes models and their parameters in process (no torch needed); generates in
        # process too unless worker processes are on.
        self.text = TransformersTextBackend([], provider=provider)
        self.image = DiffusersImageBackend([], provider=provider)
        self.vllm = VllmTextBackend([], provider=provider)
        self.gguf = GgufTextBackend([], provider=provider)
        self.mesh = ShapEMeshBackend([], provider=provider)
        self.pool: WorkerPool | None = None
        if workers is not None and workers.enabled:
            from pluggably.runners.pool import WorkerPool

            self.pool = WorkerPool(
                max_workers=workers.max_workers,
                threads_per_worker=workers.threads_per_worker,
                max_memory_bytes=workers.max_memory_bytes,
            )

    # ---- catalogue -------------------------------------------------------------------------

    def entries(self) -> list[ModelEntry]:
        """Every local model: config entries, then registry rows not shadowed by one."""
        rows = self.registry.all() if self.registry is not None else []
        entries = list(self._configured.values())
        entries += [ModelEntry.of(r) for r in rows if r.name not in self._configured]
        return sorted(entries, key=lambda e: e.name)

    def entry(self, name: str) -> ModelEntry | None:
        configured = self._configured.get(name)
        if configured is not None:
            return configured
        record = self.registry.get(name) if self.registry is not None else None
        return ModelEntry.of(record) if record is not None else None

    async def list_models(self) -> list[ModelInfo]:
        entries = self.entries()
        text_served, image_served = set(), set()
        for entry in entries:
            text_model = self._text_model(entry)
            if text_model is not None:
                self.text.ensure_model(text_model)
                text_served.add(entry.name)
            image_model = self._image_model(entry)
            if image_model is not None:
                self.image.ensure_model(image_model)
                image_served.add(entry.name)
        # Runner models the registry no longer has (deleted, vanished): freed when idle.
        for name in [n for n in self.text.served_names() if n not in text_served]:
            self.text.drop_model(name)
        for name in [n for n in self.image.served_names() if n not in image_served]:
            self.image.drop_model(name)
        gguf_served = set()
        for entry in entries:
            gguf_model = self._gguf_model(entry)
            if gguf_model is not None:
                self.gguf.ensure_model(gguf_model)
                gguf_served.add(entry.name)
        for name in [n for n in self.gguf.served_names() if n not in gguf_served]:
            self.gguf.drop_model(name)
        mesh_served = set()
        for entry in entries:
            mesh_model = self._mesh_model(entry)
            if mesh_model is not None:
                self.mesh.ensure_model(mesh_model)
                mesh_served.add(entry.name)
        for name in [n for n in self.mesh.served_names() if n not in mesh_served]:
            self.mesh.drop_model(name)
        described = {m.name: m for m in await self.text.list_models()}
        described.update((m.name, m) for m in await self.image.list_models())
        described.update((m.name, m) for m in await self.gguf.list_models())
        described.update((m.name, m) for m in await self.mesh.list_models())
        return [self._describe(e, described.get(e.name)) for e in entries]

    async def get_model(self, name: str) -> ModelInfo | None:
        entry = self.entry(name)
        if entry is None:
            return None
        text_model = self._text_model(entry)
        runner_info = None
        if text_model is not None:
            self.text.ensure_model(text_model)
            # Reading the model's files happens once; routing asks on every request.
            if self.text.files_read(name):
                runner_info = self.text.describe(name)
            else:
                runner_info = await asyncio.to_thread(self.text.describe, name)
        image_model = self._image_model(entry)
        if image_model is not None:
            self.image.ensure_model(image_model)
            runner_info = self.image.describe(name)
        gguf_model = self._gguf_model(entry)
        if gguf_model is not None:
            self.gguf.ensure_model(gguf_model)
            runner_info = await asyncio.to_thread(self.gguf.describe, name)
        mesh_model = self._mesh_model(entry)
        if mesh_model is not None:
            self.mesh.ensure_model(mesh_model)
            runner_info = self.mesh.describe(name)
        return self._describe(entry, runner_info)

    def _describe(self, entry: ModelEntry, runner_info: ModelInfo | None) -> ModelInfo:
        if self._vllm_model(entry) is not None:
            reason = _vllm_unavailable()
            if reason:  # asked for vLLM explicitly: say it cannot serve here, never fall back
                return self._describe_plain(entry, ModelState.UNSERVABLE, f"runner vllm: {reason}")
            runner_info = self.vllm.describe(entry.name)
        return self._describe_plain(entry, None, "", runner_info)

    def _describe_plain(
        self,
        entry: ModelEntry,
        state: ModelState | None,
        reason: str,
        runner_info: ModelInfo | None = None,
    ) -> ModelInfo:
        if state is not None:
            return ModelInfo(
                provider=self.provider,
                name=entry.name,
                modality=entry.modality,
                state=state,
                state_reason=reason,
                description=entry.description,
                size_bytes=entry.size_bytes,
                local=entry.details,
            )
        info = ModelInfo(
            provider=self.provider,
            name=entry.name,
            modality=entry.modality,
            state=entry.state,
            state_reason=entry.state_reason,
            description=entry.description,
            context_length=entry.context_length,
            size_bytes=entry.size_bytes,
            local=entry.details,
        )
        if runner_info is not None:
            info = replace(
                info,
                state=runner_info.state,
                state_reason=runner_info.state_reason or info.state_reason,
                context_length=runner_info.context_length or info.context_length,
                size_bytes=runner_info.size_bytes or info.size_bytes,
                loaded=runner_info.loaded,
                capabilities=runner_info.capabilities,
            )
            if runner_info.state is ModelState.ERROR and not info.state_reason:
                info = replace(info, state_reason=f"no loadable model in {entry.details.path}")
        return info

    def _vllm_model(self, entry: ModelEntry) -> LocalVllmModel | None:
        """vLLM's view of `entry` when the config asks for vLLM (`runner: vllm`)."""
        if (
            entry.settings.get("runner") != "vllm"
            or entry.state is not ModelState.AVAILABLE
            or entry.modality is not Modality.TEXT
        ):
            return None
        settings = {
            k: v for k, v in entry.settings.items() if k in _VLLM_SETTINGS and v is not None
        }
        if settings.get("dtype") in _VLLM_DTYPES:
            settings["dtype"] = _VLLM_DTYPES[settings["dtype"]]
        try:
            return LocalVllmModel(name=entry.name, path=Path(entry.details.path), **settings)
        except (TypeError, ValueError):
            log.warning("local model %s has invalid vLLM settings %r", entry.name, settings)
            return None

    def _text_model(self, entry: ModelEntry) -> LocalTextModel | None:
        """The text runner's view of `entry`, or None when the text runner does not serve it."""
        if (
            entry.state is not ModelState.AVAILABLE
            or entry.format is not ModelFormat.TRANSFORMERS
            or entry.modality is not Modality.TEXT
            or entry.settings.get("runner") == "vllm"
        ):
            return None
        settings: dict[str, Any] = {k: v for k, v in entry.settings.items() if k in _TEXT_SETTINGS}
        try:
            return LocalTextModel(name=entry.name, path=Path(entry.details.path), **settings)
        except (TypeError, ValueError):
            log.warning("local model %s has invalid settings %r", entry.name, settings)
            return None

    def _mesh_model(self, entry: ModelEntry) -> LocalMeshModel | None:
        """The 3D runner's view of `entry` (a Shap-E pipeline folder), or None."""
        if (
            entry.state is not ModelState.AVAILABLE
            or entry.format is not ModelFormat.DIFFUSERS
            or entry.modality is not Modality.MESH
        ):
            return None
        settings: dict[str, Any] = {
            k: v for k, v in entry.settings.items() if k in _IMAGE_SETTINGS and v is not None
        }
        try:
            return LocalMeshModel(name=entry.name, path=Path(entry.details.path), **settings)
        except (TypeError, ValueError):
            log.warning("local model %s has invalid settings %r", entry.name, settings)
            return None

    def _gguf_model(self, entry: ModelEntry) -> LocalTextModel | None:
        """The GGUF runner's view of `entry` (a .gguf file), or None."""
        if (
            entry.state is not ModelState.AVAILABLE
            or entry.format is not ModelFormat.GGUF
            or entry.modality is not Modality.TEXT
        ):
            return None
        settings: dict[str, Any] = {
            k: v for k, v in entry.settings.items() if k in _TEXT_SETTINGS and v is not None
        }
        try:
            return LocalTextModel(name=entry.name, path=Path(entry.details.path), **settings)
        except (TypeError, ValueError):
            log.warning("local model %s has invalid settings %r", entry.name, settings)
            return None

    def _image_model(self, entry: ModelEntry) -> LocalImageModel | None:
        """The image runner's view of `entry`, or None when the image runner does not serve it."""
        if (
            entry.state is not ModelState.AVAILABLE
            or entry.format is not ModelFormat.DIFFUSERS
            or entry.modality is not Modality.IMAGE
        ):
            return None
        settings: dict[str, Any] = {
            k: v for k, v in entry.settings.items() if k in _IMAGE_SETTINGS and v is not None
        }
        try:
            return LocalImageModel(name=entry.name, path=Path(entry.details.path), **settings)
        except (TypeError, ValueError):
            log.warning("local model %s has invalid settings %r", entry.name, settings)
            return None

    # ---- what requests may carry --------------------------------------------------------------

    def parameters(self, model: ModelInfo) -> list[ParameterSpec]:
        entry = self.entry(model.name)
        mesh_model = self._mesh_model(entry) if entry is not None else None
        if mesh_model is not None:
            self.mesh.ensure_model(mesh_model)
            return self.mesh.parameters(model)
        gguf_model = self._gguf_model(entry) if entry is not None else None
        if gguf_model is not None:
            self.gguf.ensure_model(gguf_model)
            return self.gguf.parameters(model)
        vllm_model = self._vllm_for(model.name)
        if vllm_model is not None:
            self.vllm.ensure_model(vllm_model)
            return self.vllm.parameters(model)
        if model.modality is Modality.IMAGE:
            entry = self.entry(model.name)
            image_model = self._image_model(entry) if entry is not None else None
            if image_model is not None:
                self.image.ensure_model(image_model)
            return self.image.parameters(model)
        return self.text.parameters(model)

    def provider_options(self, model: ModelInfo) -> ProviderOptionsPolicy:
        if model.modality is not Modality.TEXT:
            return NO_PROVIDER_OPTIONS
        if self._vllm_for(model.name) is not None:
            return self.vllm.provider_options(model)
        return self.text.provider_options(model)

    def _vllm_for(self, name: str) -> LocalVllmModel | None:
        entry = self.entry(name)
        return self._vllm_model(entry) if entry is not None else None

    # ---- generation ----------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        entry = self.entry(request.model)
        if entry is None:
            raise ModelNotFound(f"{self.provider}/{request.model}")
        model_id = f"{self.provider}/{entry.name}"
        if entry.state is not ModelState.AVAILABLE:
            error, reason = _NOT_READY[entry.state]
            raise error(
                f"model {model_id} cannot serve now ({entry.state.value})"
                + (f": {entry.state_reason}" if entry.state_reason else ""),
                reason=reason,
            )
        image_model = self._image_model(entry)
        if image_model is not None:
            self.image.ensure_model(image_model)
            self._touch(entry)
            async for chunk in self.image.generate(request):
                yield chunk
            return
        gguf_model = self._gguf_model(entry)
        if gguf_model is not None:
            self.gguf.ensure_model(gguf_model)
            self._touch(entry)
            async for chunk in self.gguf.generate(request):
                yield chunk
            return
        mesh_model = self._mesh_model(entry)
        if mesh_model is not None:
            self.mesh.ensure_model(mesh_model)
            self._touch(entry)
            async for chunk in self.mesh.generate(request):
                yield chunk
            return
        vllm_model = self._vllm_model(entry)
        if vllm_model is not None:
            reason = _vllm_unavailable()
            if reason:
                raise FailedPrecondition(
                    f"model {model_id} is configured for vLLM, but {reason}",
                    reason="MODEL_UNSERVABLE",
                )
            self.vllm.ensure_model(vllm_model)
            self._touch(entry)
            async for chunk in self.vllm.generate(request):
                yield chunk
            return
        text_model = self._text_model(entry)
        if text_model is None:
            raise FailedPrecondition(
                f"model {model_id} ({entry.format.value if entry.format else 'unknown format'}, "
                f"{entry.modality.value}) has no runner in this server",
                reason="MODEL_UNSERVABLE",
            )
        self.text.ensure_model(text_model)
        self._touch(entry)
        if self.pool is not None:
            settings = {
                k: v for k, v in entry.settings.items() if k in _TEXT_SETTINGS and v is not None
            }
            settings["path"] = entry.details.path
            async for chunk in self.pool.generate(entry.name, settings, request):
                yield chunk
            return
        async for chunk in self.text.generate(request):
            yield chunk

    def _touch(self, entry: ModelEntry) -> None:
        """Records the model's use (eviction order) off the event loop, once a minute."""
        registry = self.registry
        if (
            registry is not None
            and entry.details.source is not ModelSource.CONFIG
            and registry.touch_due(entry.name)
        ):
            asyncio.get_running_loop().run_in_executor(None, registry.touch, entry.name)

    # ---- what the model manager needs ----------------------------------------------------------

    def in_use(self, name: str) -> bool:
        return (
            self.text.in_use(name)
            or self.image.in_use(name)
            or self.vllm.in_use(name)
            or self.gguf.in_use(name)
            or self.mesh.in_use(name)
            or (self.pool is not None and self.pool.in_use(name))
        )

    async def release(self, name: str) -> bool:
        """Frees the runners' hold on `name` (weights, slot, worker); False while it serves."""
        if self.pool is not None and not await self.pool.stop(name):
            return False
        return (
            self.mesh.drop_model(name)
            and self.gguf.drop_model(name)
            and self.vllm.drop_model(name)
            and self.image.drop_model(name)
            and self.text.drop_model(name)
        )

    def is_configured(self, name: str) -> bool:
        return name in self._configured

    def tokens_generated(self) -> int:
        """Tokens local runners produced so far (finished and running generations)."""
        return self.text.tokens_generated()

    def active_generations(self) -> int:
        return self.text.active_generations()

    # ---- lifecycle -----------------------------------------------------------------------------

    async def health(self) -> bool:
        return await self.text.health()

    async def aclose(self) -> None:
        if self.pool is not None:
            await self.pool.aclose()
        await self.image.aclose()
        await self.vllm.aclose()
        await self.gguf.aclose()
        await self.mesh.aclose()
        await self.text.aclose()
        if self.registry is not None:
            self.registry.close()


class ModelEntry:
    """One local model as the backend sees it: a config entry or a registry row."""

    __slots__ = (
        "context_length",
        "description",
        "details",
        "format",
        "modality",
        "name",
        "settings",
        "size_bytes",
        "state",
        "state_reason",
    )

    def __init__(
        self,
        *,
        name: str,
        modality: Modality,
        state: ModelState,
        state_reason: str,
        format: ModelFormat | None,
        details: LocalDetails,
        settings: dict[str, Any],
        size_bytes: int = 0,
        description: str = "",
        context_length: int = 0,
    ) -> None:
        self.name = name
        self.modality = modality
        self.state = state
        self.state_reason = state_reason
        self.format = format
        self.details = details
        self.settings = settings
        self.size_bytes = size_bytes
        self.description = description
        self.context_length = context_length

    @classmethod
    def of(cls, record: ModelRecord) -> ModelEntry:
        return cls(
            name=record.name,
            modality=record.modality,
            state=record.state,
            state_reason=record.state_reason,
            format=record.format,
            details=record.details(),
            settings=dict(record.settings),
            size_bytes=record.size_bytes,
            description=record.description,
            context_length=record.context_length,
        )


def _config_entry(cfg: LocalModelConfig) -> ModelEntry:
    # A config model is a transformers folder (text) or a diffusers pipeline (image); its runner
    # reports it as ERROR with the reason if the folder holds no loadable model.
    settings = cfg.model_dump(exclude={"name", "path", "modality"})
    modality = Modality(cfg.modality)
    model_format = ModelFormat.TRANSFORMERS if modality is Modality.TEXT else ModelFormat.DIFFUSERS
    return ModelEntry(
        name=cfg.name,
        modality=modality,
        state=ModelState.AVAILABLE,
        state_reason="",
        format=model_format,
        # Never evicted nor deleted through the API: the operator's own files.
        details=LocalDetails(
            format=model_format,
            source=ModelSource.CONFIG,
            path=str(cfg.path),
            pinned=True,
        ),
        settings=settings,
        description=cfg.description,
        context_length=cfg.context_length or 0,
    )


def _vllm_unavailable() -> str:
    """Why vLLM cannot serve in this process ("" when it can). Checked without importing torch
    or vLLM: the module must be installed and a CUDA device visible."""
    import importlib.util
    import os

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed here (pip install vllm, on a CUDA host)"
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not os.path.exists("/dev/nvidiactl"):
        return "no CUDA GPU is visible to this process"
    return ""
