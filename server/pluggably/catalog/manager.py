"""What ModelService does to local models beyond reading them: pin, delete, rescan.

Transport-free: the servicer maps requests to these calls and domain errors to statuses. The
rules that protect an operator's disk live here:

- a model in use (generating, loading, or with requests waiting) is never deleted;
- a pinned model is never deleted (unpin it first) nor evicted;
- models from the config file are the operator's own: neither pinned, deleted nor evicted here;
- files are deleted only where the gateway owns them (it downloaded them, or they are in a
  configured model folder), unless `storage.delete_unowned` allows more; a symlink is removed,
  never followed out of the folder being deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from pluggably.catalog.discovery import FoundModel, scan
from pluggably.core.errors import FailedPrecondition, FieldViolation, InvalidArgument, ModelNotFound
from pluggably.core.types import ModelInfo, ModelSource, ModelState

if TYPE_CHECKING:
    from pluggably.catalog.registry import ModelRecord, ModelRegistry
    from pluggably.config import StorageConfig
    from pluggably.runners.local import LocalBackend

log = logging.getLogger(__name__)


class ModelManager:
    def __init__(
        self, registry: ModelRegistry, local: LocalBackend | None, storage: StorageConfig
    ) -> None:
        self.registry = registry
        self.local = local
        self.storage = storage
        self._deleting: set[str] = set()
        self._scan_lock = asyncio.Lock()

    # ---- ids -----------------------------------------------------------------------------------

    def local_name(self, model_id: str, field: str = "id") -> str:
        """The registry name of a `local/<name>` id; INVALID_ARGUMENT for anything else."""
        provider = self.local.provider if self.local is not None else "local"
        prefix = f"{provider}/"
        name = model_id[len(prefix) :] if model_id.startswith(prefix) else ""
        if not name.strip():
            raise InvalidArgument(
                [FieldViolation(field, f"required: the id of a local model, `{prefix}<name>`")]
            )
        if any(part in ("", ".", "..") for part in name.split("/")) or "\\" in name:
            raise InvalidArgument(
                [FieldViolation(field, "a local model name has no empty, `.` or `..` parts")]
            )
        return name

    def _record(self, model_id: str) -> ModelRecord:
        name = self.local_name(model_id)
        if self.local is not None and self.local.is_configured(name):
            raise FailedPrecondition(
                f"model {model_id} comes from the config file (local.models): it is never "
                "evicted or deleted through the API; edit the config to change it",
                reason="MODEL_CONFIGURED",
            )
        record = self.registry.get(name)
        if record is None:
            raise ModelNotFound(model_id)
        return record

    def recover(self) -> None:
        """At start: a delete interrupted by a crash left its model DELETING; say so."""
        for record in self.registry.all():
            if record.state is ModelState.DELETING:
                self.registry.set_state(
                    record.name,
                    ModelState.ERROR,
                    "a deletion was interrupted; delete it again to finish",
                )

    # ---- discovery -----------------------------------------------------------------------------

    async def rescan(self) -> tuple[list[str], list[str]]:
        """Scans the model folders (and the Hugging Face cache) and brings the registry's
        discovered models up to date: (ids added, ids removed). One scan at a time."""
        async with self._scan_lock:
            found = await asyncio.to_thread(
                scan,
                self.storage.model_folders,
                self.storage.hf_cache if self.storage.scan_hf_cache else None,
            )
            records = [self._record_of(f) for f in found]
            added, removed = await asyncio.to_thread(
                self.registry.sync, ModelSource.DISCOVERY, records
            )
        provider = self.local.provider if self.local is not None else "local"
        if added or removed:
            log.info("rescan: %d models found, %d gone", len(added), len(removed))
        return [f"{provider}/{r.name}" for r in added], [f"{provider}/{r.name}" for r in removed]

    def _record_of(self, found: FoundModel) -> ModelRecord:
        from pluggably.catalog.registry import ModelRecord

        path = Path(os.path.abspath(found.path))
        owned = any(
            _inside(path, Path(os.path.abspath(folder))) for folder in self.storage.model_folders
        )
        return ModelRecord(
            name=found.name,
            source=ModelSource.DISCOVERY,
            modality=found.modality,
            format=found.format,
            path=str(found.path),
            state=ModelState.AVAILABLE if found.servable else ModelState.UNSERVABLE,
            state_reason=found.reason,
            source_repo=found.source_repo or "",
            resolved_revision=found.revision or "",
            size_bytes=found.size_bytes,
            owned=owned,
            description=found.display_name,
        )

    async def run_rescans(self) -> None:
        """Scans now, then every `storage.rescan_interval_s` (0: only now). Runs until
        cancelled; a failed scan is logged and the next one tries again."""
        while True:
            try:
                await self.rescan()
            except Exception:
                log.exception("scanning for local models failed")
            if not self.storage.rescan_interval_s:
                return
            await asyncio.sleep(self.storage.rescan_interval_s)

    # ---- pin -----------------------------------------------------------------------------------

    async def set_pinned(self, model_id: str, pinned: bool) -> ModelInfo:
        record = self._record(model_id)
        self.registry.set_pinned(record.name, pinned)
        log.info("model %s %s", model_id, "pinned" if pinned else "unpinned")
        return await self.describe(record.name)

    async def describe(self, name: str) -> ModelInfo:
        if self.local is not None:
            info = await self.local.get_model(name)
            if info is not None:
                return info
        raise ModelNotFound(f"local/{name}")

    # ---- delete --------------------------------------------------------------------------------

    async def delete(self, model_id: str) -> int:
        """Deletes a local model's files and forgets it; the bytes freed."""
        record = self._record(model_id)
        name = record.name
        if record.pinned:
            raise FailedPrecondition(
                f"model {model_id} is pinned: unpin it first (UnpinModel)", reason="MODEL_PINNED"
            )
        if record.state is ModelState.DOWNLOADING:
            raise FailedPrecondition(
                f"model {model_id} is being downloaded: cancel the download instead",
                reason="MODEL_DOWNLOADING",
            )
        if name in self._deleting or record.state is ModelState.DELETING:
            raise FailedPrecondition(
                f"model {model_id} is already being deleted", reason="MODEL_DELETING"
            )
        path = Path(record.path)
        if not self.may_delete(record):
            raise FailedPrecondition(
                f"the files of {model_id} ({path}) are outside the folders this gateway manages "
                "(a download, or storage.model_folders); set storage.delete_unowned: true to "
                "allow deleting them",
                reason="MODEL_NOT_OWNED",
            )
        self._deleting.add(name)
        try:
            if self.local is not None and not await self.local.release(name):
                raise FailedPrecondition(
                    f"model {model_id} is serving requests; retry when it is idle",
                    reason="MODEL_IN_USE",
                )
            self.registry.set_state(name, ModelState.DELETING)
            try:
                freed = await asyncio.to_thread(self._remove_files, record)
            except Exception as exc:  # whatever it was, the row must not stay DELETING
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                why = why or type(exc).__name__
                self.registry.set_state(name, ModelState.ERROR, f"deleting its files failed: {why}")
                raise FailedPrecondition(
                    f"could not delete the files of {model_id}: {why}",
                    reason="MODEL_DELETE_FAILED",
                ) from None
            self.registry.remove(name)
        finally:
            self._deleting.discard(name)
        log.info("deleted model %s (%d bytes freed)", model_id, freed)
        return freed

    def may_delete(self, record: ModelRecord) -> bool:
        if record.owned or self.storage.delete_unowned:
            return True
        path = Path(os.path.abspath(record.path))
        return any(
            _inside(path, Path(os.path.abspath(folder))) for folder in self.storage.model_folders
        )

    def in_use(self, name: str) -> bool:
        return self.local is not None and self.local.in_use(name)

    def _remove_files(self, record: ModelRecord) -> int:
        path = Path(record.path)
        cache = Path(os.path.abspath(self.storage.hf_cache))
        if record.source_repo and _inside(Path(os.path.abspath(path)), cache):
            return delete_cache_revision(cache, record.source_repo, record.resolved_revision)
        return _remove_tree(path)


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and path.is_relative_to(folder)


def _remove_tree(path: Path) -> int:
    """Removes `path` (a file, a folder, or a symlink: the link itself), never following a
    symlink; returns the bytes of the regular files removed."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(info.st_mode):  # a file or a symlink (to anything): unlink it
        path.unlink()
        return info.st_size if stat.S_ISREG(info.st_mode) else 0
    freed = 0
    for root, _dirs, files in os.walk(path, followlinks=False):
        # Links to folders are listed in `dirs` and not walked (followlinks=False): nothing.
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                entry = os.lstat(os.path.join(root, name))
                if stat.S_ISREG(entry.st_mode):
                    freed += entry.st_size
    shutil.rmtree(path)  # rmtree removes symlinks inside without following them
    return freed


def delete_cache_revision(cache: Path, repo_id: str, revision: str) -> int:
    """Deletes one snapshot from the Hugging Face cache the way huggingface_hub does: its
    blobs that no other revision uses, its snapshot folder and refs pointing at it."""
    from huggingface_hub import scan_cache_dir

    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo_dir.exists():
        return 0  # nothing of it is left
    info = scan_cache_dir(cache)
    commits = {
        rev.commit_hash
        for repo in info.repos
        if repo.repo_id == repo_id and repo.repo_type == "model"
        for rev in repo.revisions
        if not revision or rev.commit_hash == revision
    }
    if not commits:
        # huggingface_hub could not read this revision (a broken link): remove its snapshot
        # folder ourselves; unreferenced blobs are left for a later prune.
        snapshot = repo_dir / "snapshots" / revision
        if revision and snapshot.is_dir():
            return _remove_tree(snapshot)
        raise FileNotFoundError(f"revision {revision or '?'} of {repo_id} is not in the cache")
    strategy = info.delete_revisions(*commits)
    freed = strategy.expected_freed_size
    strategy.execute()
    return int(freed)
