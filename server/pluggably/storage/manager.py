"""One place that knows what the gateway keeps on disk: local models (through the model manager),
generated artifacts, and temporary files, measured against one `DiskBudget`.

Transport-free: the StorageService servicer and, later, downloads and generation call it. What
may be removed to make room is decided here (the eligibility rules themselves are the budget's):
local models the gateway may delete (see `catalog/manager.py`) that are not pinned, not from the
config file and not in use, and every artifact.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pluggably.core.errors import FailedPrecondition
from pluggably.core.types import ModelState
from pluggably.storage.artifacts import ArtifactStore, FilesystemArtifactStore
from pluggably.storage.budget import Category, DiskBudget, EvictionCandidate, Usage

if TYPE_CHECKING:
    from pluggably.catalog.manager import ModelManager
    from pluggably.config import StorageConfig

log = logging.getLogger(__name__)

_MODEL_PREFIX = "local/"
# Models that may be removed to make room: never one being downloaded or deleted.
_EVICTABLE_STATES = frozenset({ModelState.AVAILABLE, ModelState.UNSERVABLE, ModelState.ERROR})
# Seconds between retention passes over the artifact store.
RETENTION_INTERVAL_S = 60.0


@dataclass(frozen=True)
class UsageReport:
    usage: Usage
    item_counts: Mapping[Category, int]


@dataclass(frozen=True)
class PruneResult:
    freed_bytes: int
    removed: list[str]


class StorageManager:
    def __init__(
        self,
        config: StorageConfig,
        models: ModelManager | None,
        artifacts: ArtifactStore,
    ) -> None:
        self.config = config
        self.models = models
        self.artifacts = artifacts
        self.temporary_dir = config.root / "tmp"
        # Artifact totals are measured asynchronously and read by the budget's sync `measure`.
        self._artifact_usage = (0, 0)
        config.root.mkdir(parents=True, exist_ok=True)
        self.budget = DiskBudget.from_config(config.root, config.limits, measure=self._measure)

    @classmethod
    async def open(cls, config: StorageConfig, models: ModelManager | None) -> StorageManager:
        artifacts = await FilesystemArtifactStore.open(
            config.root / "artifacts", default_ttl_s=config.artifact_ttl_s
        )
        manager = cls(config, models, artifacts)
        await manager.refresh()
        return manager

    async def aclose(self) -> None:
        await self.artifacts.close()

    # ---- measuring -----------------------------------------------------------------------------

    def _models(self) -> list[tuple[str, int]]:
        """(id, bytes) of the local models whose files count against the budget: the ones the
        gateway manages (it may delete them), not the user's own files elsewhere."""
        if self.models is None:
            return []
        return [
            (r.name, r.size_bytes)
            for r in self.models.registry.all()
            if r.state is not ModelState.DOWNLOADING and self.models.may_delete(r)
        ]

    def _measure(self) -> Mapping[Category, int]:
        return {
            Category.MODELS: sum(size for _, size in self._models()),
            Category.ARTIFACTS: self._artifact_usage[0],
            Category.CACHE: 0,
            Category.TEMPORARY: _tree_bytes(self.temporary_dir),
        }

    async def refresh(self) -> None:
        self._artifact_usage = await self.artifacts.usage()

    async def usage(self) -> UsageReport:
        await self.refresh()
        usage = await asyncio.to_thread(self.budget.usage)
        counts = {
            Category.MODELS: len(self._models()),
            Category.ARTIFACTS: self._artifact_usage[1],
            Category.CACHE: 0,
            Category.TEMPORARY: await asyncio.to_thread(_tree_count, self.temporary_dir),
        }
        return UsageReport(usage, counts)

    # ---- retention -----------------------------------------------------------------------------

    async def enforce_retention(self) -> list[str]:
        """Removes expired artifacts, then the oldest ones while the artifacts are over
        `storage.limits.artifacts_bytes`; the ids removed."""
        removed = await self.artifacts.expire()
        limit = self.config.limits.artifacts_bytes
        if limit is not None:
            removed += await self.artifacts.evict_to(limit)
        if removed:
            log.info("artifact retention removed %d artifacts", len(removed))
            await self.refresh()
        return [a.id for a in removed]

    async def run_retention(self, interval_s: float = RETENTION_INTERVAL_S) -> None:
        """Enforces retention now and then every `interval_s`, until cancelled."""
        while True:
            try:
                await self.enforce_retention()
            except Exception:
                log.exception("artifact retention failed")
            await asyncio.sleep(interval_s)

    # ---- making room ---------------------------------------------------------------------------

    async def candidates(self, categories: Iterable[Category] = ()) -> list[EvictionCandidate]:
        wanted = set(categories) or {Category.MODELS, Category.ARTIFACTS}
        out: list[EvictionCandidate] = []
        if Category.MODELS in wanted and self.models is not None:
            manager = self.models
            for record in manager.registry.all():
                if (
                    record.state not in _EVICTABLE_STATES
                    or not manager.may_delete(record)
                    or (manager.local is not None and manager.local.is_configured(record.name))
                ):
                    continue
                out.append(
                    EvictionCandidate(
                        id=_MODEL_PREFIX + record.name,
                        category=Category.MODELS,
                        size_bytes=record.size_bytes,
                        pinned=record.pinned,
                        in_use=manager.in_use(record.name),
                        last_used=record.last_used_at or record.created_at,
                    )
                )
        if Category.ARTIFACTS in wanted:
            token = ""
            while True:
                page, token = await self.artifacts.list(page_size=1000, page_token=token)
                out += [
                    EvictionCandidate(
                        id=a.id,
                        category=Category.ARTIFACTS,
                        size_bytes=a.size_bytes,
                        last_used=a.created,
                    )
                    for a in page
                ]
                if not token:
                    break
        return out

    async def prune(
        self,
        categories: Iterable[Category] = (),
        *,
        target_free_bytes: int = 0,
        older_than_s: float | None = None,
        dry_run: bool = False,
    ) -> PruneResult:
        categories = list(categories)
        await self.refresh()
        expired = [] if dry_run else await self.artifacts.expire()
        candidates = await self.candidates(categories)
        plan = self.budget.prune_plan(
            categories,
            target_free_bytes=target_free_bytes,
            older_than_s=older_than_s,
            candidates=candidates,
        )
        removed = [a.id for a in expired]
        freed = sum(a.size_bytes for a in expired)
        for candidate in plan:
            if dry_run:
                freed += candidate.size_bytes
                removed.append(candidate.id)
                continue
            freed += await self.remove(candidate)
            removed.append(candidate.id)
        await self.refresh()
        return PruneResult(freed, removed)

    async def remove(self, candidate: EvictionCandidate) -> int:
        """Deletes one candidate (a budget's `evict` callback); the bytes freed."""
        if candidate.category is Category.MODELS:
            assert self.models is not None
            try:
                freed = await self.models.delete(candidate.id)
            except FailedPrecondition as exc:
                # It became busy, pinned or is being deleted since the candidates were listed:
                # it stays, and the budget, measuring again, refuses if the room is not there.
                log.info("storage: kept %s: %s", candidate.id, exc.message)
                return 0
        else:
            freed = await self.artifacts.delete(candidate.id)
        log.info("storage: removed %s (%d bytes)", candidate.id, freed)
        await self.refresh()
        return freed


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total


def _tree_count(path: Path) -> int:
    return sum(len(files) for _root, _dirs, files in os.walk(path))
