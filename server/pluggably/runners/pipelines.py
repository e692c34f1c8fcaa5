"""What the diffusers runners (images, 3D) share: one slot per pipeline folder, and the model
management the local backend calls (ensure, drop, in use, describe).

A pipeline object is not reentrant (its scheduler keeps per-call state), so each slot admits one
generation at a time; more wait in its admission queue, fair across API keys and bounded.
"""

from __future__ import annotations

import abc
import asyncio
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pluggably.core.backend import Backend
from pluggably.core.types import Capabilities, Modality, ModelInfo, ModelState
from pluggably.runners.admission import AdmissionQueue


class PipelineModel(Protocol):
    """The settings every pipeline model has (LocalImageModel, LocalMeshModel)."""

    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def max_queue(self) -> int: ...
    @property
    def queue_timeout_s(self) -> float: ...


M = TypeVar("M", bound=PipelineModel)


class PipelineSlot(Generic[M]):
    def __init__(self, cfg: M, provider: str) -> None:
        self.cfg = cfg
        self.model_id = f"{provider}/{cfg.name}"
        self.admission = AdmissionQueue(
            self.model_id,
            max_concurrency=1,
            max_queue=cfg.max_queue,
            queue_timeout_s=cfg.queue_timeout_s,
        )
        self.pipeline: Any = None
        self.device: Any = None
        self.load_lock = asyncio.Lock()
        self.load_error: str = ""
        self.load_failed_at = 0.0
        self.busy = False


S = TypeVar("S", bound=PipelineSlot[Any])


class PipelineBackend(Backend, Generic[M, S]):
    """Model management of a diffusers runner; subclasses set MODALITY and `_new_slot`."""

    MODALITY: ClassVar[Modality]

    def __init__(self, models: list[M] | tuple[M, ...] = (), provider: str = "local") -> None:
        self.provider = provider
        self._slots: dict[str, S] = {m.name: self._new_slot(m) for m in models}
        self._closed = False

    @abc.abstractmethod
    def _new_slot(self, cfg: M) -> S:
        """A slot for `cfg`: each runner keeps its own state in it."""

    def ensure_model(self, cfg: M) -> None:
        slot = self._slots.get(cfg.name)
        if slot is not None and (slot.cfg == cfg or self.in_use(cfg.name)):
            return
        self._slots[cfg.name] = self._new_slot(cfg)

    def drop_model(self, name: str) -> bool:
        if self.in_use(name):
            return False
        self._slots.pop(name, None)
        return True

    def in_use(self, name: str) -> bool:
        slot = self._slots.get(name)
        if slot is None:
            return False
        return slot.busy or slot.admission.running > 0 or slot.admission.waiting > 0

    def served_names(self) -> list[str]:
        return list(self._slots)

    async def list_models(self) -> list[ModelInfo]:
        return [info for name in self._slots if (info := self.describe(name)) is not None]

    def describe(self, name: str) -> ModelInfo | None:
        slot = self._slots.get(name)
        if slot is None:
            return None
        state, reason = ModelState.AVAILABLE, ""
        if slot.load_error:
            state, reason = ModelState.ERROR, slot.load_error
        return ModelInfo(
            provider=self.provider,
            name=name,
            modality=self.MODALITY,
            state=state,
            state_reason=reason,
            description=slot.cfg.description,
            loaded=slot.pipeline is not None,
            capabilities=Capabilities(streaming=True),
        )
