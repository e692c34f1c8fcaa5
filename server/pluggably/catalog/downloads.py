"""Model downloads from the Hugging Face Hub as jobs: start or join, watch, cancel, recover.

`DownloadModel` resolves the repository and revision first (one metadata request: a missing
repo, revision or a gated repo is the RPC's own error), reserves the bytes in the disk budget
(refused up front when they cannot fit, after evicting idle unpinned models if the policy
allows), registers the model as DOWNLOADING and returns the job; the transfer runs in the
background. The same repository, revision and patterns asked again join the running job.

Files go through huggingface_hub's own `hf_hub_download`, one file at a time per job, into the
standard cache layout (`storage.hf_cache`, shared with the user's other tools) or into
`storage.downloads_dir/<repo id>`. Two things huggingface_hub does not offer are added around it
(see FACTS.md): progress in bytes as they arrive, and a cancel that takes effect at once. Both
come from one HTTP transport installed in huggingface_hub's client factory: a worker thread names
the job whose file it fetches (a thread-local), and the transport counts and checks every chunk
of that thread's responses, redirects included.

On success the model is registered (format, modality and servability from discovery) and serves
at once. On failure or cancel nothing is registered, the reservation is returned, and the files
the job left (partial blobs, a snapshot that did not exist before) are removed. Jobs are saved in
the registry database; at start, jobs of a process that is gone are marked FAILED and their
files cleaned the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pluggably.core.errors import (
    Cancelled,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PluggablyError,
    Unavailable,
)
from pluggably.core.types import Modality, ModelSource, ModelState

if TYPE_CHECKING:
    from pluggably.catalog.manager import ModelManager
    from pluggably.config import StorageConfig
    from pluggably.storage.budget import Reservation
    from pluggably.storage.manager import StorageManager

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
ACTIVE = (QUEUED, RUNNING)
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^(?:{_REPO_PART}/)?{_REPO_PART}$")
_MAX_PATTERN = 256
_MAX_PATTERNS = 64
# Progress notifications to watchers: at most this often (a chunk is 10 KiB..1 MiB).
_NOTIFY_EVERY_S = 0.2
_RATE_WINDOW_S = 5.0
# Ended jobs kept in memory for Get/Watch; older ones are read back from the database.
_KEEP_ENDED = 64


class DownloadCancelled(Exception):
    """Raised inside a transfer thread when its job was cancelled."""


@dataclass
class DownloadJob:
    id: str
    repo_id: str
    requested_revision: str
    name: str
    allow_patterns: list[str]
    ignore_patterns: list[str]
    pinned: bool = False
    revision: str = ""  # the commit
    state: str = QUEUED
    downloaded_bytes: int = 0
    total_bytes: int = 0
    downloaded_files: int = 0
    total_files: int = 0
    bytes_per_second: float = 0.0
    eta_s: float | None = None
    error: PluggablyError | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    path: str = ""  # where the files land (snapshot folder or local folder)
    snapshot_existed: bool = False

    # Runtime only.
    files: list[tuple[str, int]] = field(default_factory=list, repr=False)
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    file_progress: dict[str, int] = field(default_factory=dict, repr=False)
    done_bytes: int = 0  # bytes of files finished
    samples: deque[tuple[float, int]] = field(default_factory=deque, repr=False)
    version: int = 0
    # The cache blob names (etags) of this job's files: all it may remove when it fails.
    blobs: list[str] = field(default_factory=list, repr=False)
    foreign: bool = False  # run by another server process sharing the registry

    @property
    def ended(self) -> bool:
        return self.state not in ACTIVE

    def key(self) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
        return (
            self.repo_id,
            self.requested_revision,
            tuple(self.allow_patterns),
            tuple(self.ignore_patterns),
        )

    # Called from transfer threads.
    def check(self) -> None:
        if self.cancel_event.is_set():
            raise DownloadCancelled

    def document(self) -> dict[str, Any]:
        error = None
        if self.error is not None:
            error = {
                "kind": type(self.error).__name__,
                "message": self.error.message,
                "reason": self.error.reason,
            }
        return {
            "id": self.id,
            "repo_id": self.repo_id,
            "requested_revision": self.requested_revision,
            "name": self.name,
            "allow_patterns": self.allow_patterns,
            "ignore_patterns": self.ignore_patterns,
            "pinned": self.pinned,
            "revision": self.revision,
            "state": self.state,
            "downloaded_bytes": self.downloaded_bytes,
            "total_bytes": self.total_bytes,
            "downloaded_files": self.downloaded_files,
            "total_files": self.total_files,
            "error": error,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "path": self.path,
            "snapshot_existed": self.snapshot_existed,
            "blobs": self.blobs,
        }

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> DownloadJob:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        runtime = {"files", "cancel_event", "file_progress", "samples", "error", "foreign"}
        job = cls(**{k: v for k, v in doc.items() if k in names and k not in runtime})
        error = doc.get("error")
        if error:
            kinds = {c.__name__: c for c in _ERROR_KINDS}
            kind = kinds.get(error.get("kind", ""), FailedPrecondition)
            job.error = _rebuild(kind, error.get("message", ""), error.get("reason"))
        return job


_ERROR_KINDS: tuple[type[PluggablyError], ...] = (
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unavailable,
    Cancelled,
)


def _rebuild(kind: type[PluggablyError], message: str, reason: str | None) -> PluggablyError:
    if kind is NotFound:
        return NotFound(message, resource_type="model", resource_name="", reason=reason)
    return kind(message, reason=reason)


# ---- the transport that counts and cancels ---------------------------------------------------

_current = threading.local()  # .job, .file: what this thread is fetching
_install_lock = threading.Lock()
_installed = False


def _install_transport() -> None:
    """Makes huggingface_hub's shared HTTP client count and cancel per job (once)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        import httpx2
        from huggingface_hub.utils import _http

        class CountingStream(httpx2.SyncByteStream):
            def __init__(self, inner: Any, job: DownloadJob, file: str, start: int) -> None:
                self._inner = inner
                self._job = job
                self._file = file
                job.file_progress[file] = start

            def __iter__(self) -> Any:
                job, file = self._job, self._file
                for chunk in self._inner:
                    job.check()
                    job.file_progress[file] = job.file_progress.get(file, 0) + len(chunk)
                    yield chunk

            def close(self) -> None:
                self._inner.close()

        class CountingTransport(httpx2.BaseTransport):
            def __init__(self) -> None:
                self._inner = httpx2.HTTPTransport()

            def handle_request(self, request: Any) -> Any:
                job: DownloadJob | None = getattr(_current, "job", None)
                if job is not None:
                    job.check()
                response = self._inner.handle_request(request)
                if job is None or request.method != "GET" or response.status_code >= 300:
                    return response
                start = 0
                match = re.match(r"bytes=(\d+)-", request.headers.get("range", ""))
                if match:
                    start = int(match.group(1))
                response.stream = CountingStream(response.stream, job, _current.file, start)
                return response

            def close(self) -> None:
                self._inner.close()

        def factory() -> Any:
            return httpx2.Client(
                transport=CountingTransport(),
                event_hooks={"request": [_http.hf_request_event_hook]},
                follow_redirects=True,
                timeout=None,
            )

        _http.set_client_factory(factory)
        _installed = True


# ---- validation ------------------------------------------------------------------------------


def check_request(
    repo_id: str,
    revision: str,
    name: str,
    allow_patterns: Sequence[str],
    ignore_patterns: Sequence[str],
) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    if not repo_id:
        violations.append(FieldViolation("repo_id", "required: a repository id like `org/name`"))
    elif not _REPO_ID.match(repo_id) or ".." in repo_id:
        violations.append(
            FieldViolation(
                "repo_id",
                "must be `name` or `org/name`: letters, digits, `.`, `_` and `-`, at most 96 "
                "characters each, no `..`",
            )
        )
    if revision and (
        len(revision) > 256
        or not revision.isprintable()
        or any(c.isspace() for c in revision)
        or ".." in revision
        or revision.startswith("/")
    ):
        violations.append(FieldViolation("revision", "a branch, tag or commit: no spaces, no `..`"))
    if name:
        parts = name.split("/")
        if (
            len(name) > 200
            or not name.isprintable()
            or any(p in ("", ".", "..") for p in parts)
            or "\\" in name
        ):
            violations.append(
                FieldViolation("name", "a local name: no empty, `.` or `..` parts, at most 200")
            )
    for field_name, patterns in (
        ("allow_patterns", allow_patterns),
        ("ignore_patterns", ignore_patterns),
    ):
        if len(patterns) > _MAX_PATTERNS:
            violations.append(FieldViolation(field_name, f"at most {_MAX_PATTERNS} patterns"))
            continue
        for index, pattern in enumerate(patterns):
            if (
                not pattern
                or len(pattern) > _MAX_PATTERN
                or not pattern.isprintable()
                or pattern.startswith("/")
                or ".." in pattern.split("/")
                or "\\" in pattern
            ):
                violations.append(
                    FieldViolation(
                        f"{field_name}[{index}]",
                        "a glob relative to the repository: no `..` parts, not absolute",
                    )
                )
    return violations


# ---- the manager -----------------------------------------------------------------------------


class DownloadManager:
    def __init__(
        self,
        storage: StorageConfig,
        models: ModelManager,
        space: StorageManager | None,
    ) -> None:
        self.config = storage
        self.models = models
        self.space = space
        self._jobs: dict[str, DownloadJob] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._reservations: dict[str, Reservation] = {}
        self._slots = asyncio.Semaphore(storage.hub.max_concurrent)
        self._changed: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        # Requests being resolved, by key: an identical request waits for the same job.
        self._pending: dict[
            tuple[str, str, tuple[str, ...], tuple[str, ...]], asyncio.Future[DownloadJob]
        ] = {}
        self._pending_names: set[str] = set()
        # This manager, as the owner of the jobs it runs: a random id (never reused, unlike a
        # pid or a container's hostname) whose lock file it holds while it lives.
        self._owner = uuid.uuid4().hex
        self._owner_lock = _OwnerLock(Path(storage.root) / "owners", self._owner)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Marks jobs of processes that are gone as FAILED and removes their files."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._owner_lock.acquire)
        docs = self.models.registry.downloads(states=ACTIVE)
        for doc in docs:
            owner = doc.get("owner", "")
            if owner == self._owner or self._owner_lock.alive(owner):
                continue
            job = DownloadJob.from_document(doc)
            job.error = Unavailable(
                "the download was interrupted: the server stopped while it ran; start it again",
                reason="DOWNLOAD_INTERRUPTED",
            )
            job.state = FAILED
            await asyncio.to_thread(self._clean, job)
            self._forget_model(job)
            self._save(job)
            log.warning("download %s of %s was interrupted; marked failed", job.id, job.repo_id)

    async def aclose(self) -> None:
        for job in self._jobs.values():
            if not job.ended:
                job.cancel_event.set()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._owner_lock.release()

    # ---- RPCs ------------------------------------------------------------------------------

    async def download(
        self,
        repo_id: str,
        *,
        revision: str = "",
        name: str = "",
        allow_patterns: Sequence[str] = (),
        ignore_patterns: Sequence[str] = (),
        pinned: bool = False,
    ) -> DownloadJob:
        violations = check_request(repo_id, revision, name, allow_patterns, ignore_patterns)
        if violations:
            raise InvalidArgument(violations)
        revision = revision or "main"
        name = name or repo_id
        key = (repo_id, revision, tuple(allow_patterns), tuple(ignore_patterns))
        async with self._lock:  # checks and claims only: resolving happens outside
            joined = self._active(key)
            if joined is not None:
                return joined
            pending = self._pending.get(key)
            if pending is None:
                self._check_name(name)
                pending = self._pending[key] = asyncio.get_running_loop().create_future()
                self._pending_names.add(name)
                mine = True
            else:
                mine = False
        if not mine:
            return await asyncio.shield(pending)
        try:
            job = DownloadJob(
                id=uuid.uuid4().hex,
                repo_id=repo_id,
                requested_revision=revision,
                name=name,
                allow_patterns=list(allow_patterns),
                ignore_patterns=list(ignore_patterns),
                pinned=pinned,
            )
            await self._resolve(job)
            await self._reserve(job)
            self._jobs[job.id] = job
            self._changed[job.id] = asyncio.Event()
            self._register_downloading(job)
            self._save(job)
            self._tasks[job.id] = asyncio.create_task(self._run(job))
            pending.set_result(job)
        except BaseException as exc:
            pending.set_exception(exc)
            pending.exception()  # retrieved here: waiters, if any, raise it themselves
            raise
        finally:
            async with self._lock:
                self._pending.pop(key, None)
                self._pending_names.discard(name)
        log.info(
            "download %s: %s@%s (%d files, %d bytes) as local/%s",
            job.id,
            repo_id,
            job.revision,
            job.total_files,
            job.total_bytes,
            name,
        )
        return job

    def _active(self, key: tuple[str, str, tuple[str, ...], tuple[str, ...]]) -> DownloadJob | None:
        """A running job with this key: this process's, or another live server's."""
        for job in self._jobs.values():
            if not job.ended and job.key() == key:
                return job
        for doc in self.models.registry.downloads(states=ACTIVE):
            owner = doc.get("owner", "")
            if owner == self._owner or not self._owner_lock.alive(owner):
                continue
            job = DownloadJob.from_document(doc)
            if job.key() == key:
                job.foreign = True
                return job
        return None

    def get(self, job_id: str) -> DownloadJob:
        if not job_id:
            raise InvalidArgument([FieldViolation("id", "required: a download id")])
        job = self._jobs.get(job_id)
        if job is not None:
            return job
        if re.fullmatch(r"[0-9a-f]{32}", job_id or ""):
            doc = self.models.registry.download(job_id)
            if doc is not None:
                job = DownloadJob.from_document(doc)
                job.foreign = doc.get("owner") != self._owner
                return job
        raise NotFound(
            "no such download",
            resource_type="download",
            resource_name=job_id[:64],
            reason="DOWNLOAD_NOT_FOUND",
        )

    def list(self, state: str | None = None) -> list[DownloadJob]:
        seen: dict[str, DownloadJob] = {}
        for doc in self.models.registry.downloads():
            job = self._jobs.get(doc["id"]) or DownloadJob.from_document(doc)
            seen[job.id] = job
        for job in self._jobs.values():
            seen.setdefault(job.id, job)
        jobs = sorted(seen.values(), key=lambda j: (j.created_at, j.id), reverse=True)
        return [j for j in jobs if state is None or j.state == state]

    async def watch(self, job_id: str) -> AsyncIterator[DownloadJob]:
        """The job now, then at every change (progress at most every 0.2 s), until it ends."""
        job = self.get(job_id)
        yield job
        if job.id not in self._changed:
            # Another process runs it (or it ended before this process started): follow what
            # it saves until it ends.
            last = job.document()
            while not job.ended:
                await asyncio.sleep(_NOTIFY_EVERY_S * 2.5)
                job = self.get(job_id)
                if job.document() != last:
                    last = job.document()
                    yield job
            return
        seen = job.version
        while not job.ended:
            event = self._changed[job.id]
            if job.version == seen:
                event.clear()
                await event.wait()
            seen = job.version
            yield job

    async def cancel(self, job_id: str) -> DownloadJob:
        job = self.get(job_id)
        if job.ended:
            return job
        if job.id not in self._tasks:  # another process runs it: ask it to stop
            self.models.registry.request_cancel(job.id)
            for _ in range(50):
                await asyncio.sleep(0.2)
                job = self.get(job_id)
                if job.ended:
                    break
            return job
        job.cancel_event.set()
        task = self._tasks[job.id]
        if job.state == QUEUED:
            task.cancel()  # still waiting for a slot: nothing is transferring
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), 10)
        return job

    # ---- steps -----------------------------------------------------------------------------

    def _token(self) -> str | None:
        token = os.environ.get(self.config.hub.token_env) or None
        if token:
            from pluggably.observability.logging import register_secret

            register_secret(token)
        return token

    def _check_name(self, name: str) -> None:
        local = self.models.local
        if local is not None and local.is_configured(name):
            raise FailedPrecondition(
                f"a model named local/{name} is in the config file; choose another name",
                reason="MODEL_EXISTS",
            )
        if self.models.registry.get(name) is not None:
            raise FailedPrecondition(
                f"a model named local/{name} exists; delete it first or choose another name",
                reason="MODEL_EXISTS",
            )

    async def _resolve(self, job: DownloadJob) -> None:
        """Repository, revision and file list from the Hub (a clear error for each failure)."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
        from huggingface_hub.utils import filter_repo_objects

        api = HfApi(endpoint=self.config.hub.endpoint, token=self._token())

        def fetch() -> Any:
            return api.model_info(
                job.repo_id,
                revision=job.requested_revision,
                files_metadata=True,
                timeout=self.config.hub.timeout_s,
            )

        try:
            info = await asyncio.to_thread(fetch)
        except GatedRepoError:
            raise PermissionDenied(
                f"{job.repo_id} is gated: accept its terms on the Hub and set a token with "
                f"access in ${self.config.hub.token_env}",
                reason="REPO_GATED",
                metadata={"repo_id": job.repo_id},
            ) from None
        except RevisionNotFoundError:
            raise NotFound(
                f"{job.repo_id} has no revision {job.requested_revision!r}",
                resource_type="revision",
                resource_name=job.requested_revision,
                reason="REVISION_NOT_FOUND",
            ) from None
        except RepositoryNotFoundError:
            raise NotFound(
                f"no model repository {job.repo_id} on the Hub (or it is private: set a token "
                f"in ${self.config.hub.token_env})",
                resource_type="repository",
                resource_name=job.repo_id,
                reason="REPO_NOT_FOUND",
            ) from None
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status == 401:
                raise FailedPrecondition(
                    f"the Hub refused the token in ${self.config.hub.token_env}",
                    reason="HUB_TOKEN_INVALID",
                ) from None
            raise Unavailable(
                f"the Hub answered {status} for {job.repo_id}; retry later",
                reason="HUB_UNAVAILABLE",
            ) from None
        except OSError as exc:  # httpx's network errors are OSErrors too
            raise Unavailable(
                f"cannot reach the Hub at {self.config.hub.endpoint}: {type(exc).__name__}",
                reason="HUB_UNAVAILABLE",
            ) from None
        except Exception as exc:
            if type(exc).__module__.startswith("httpx"):
                raise Unavailable(
                    f"cannot reach the Hub at {self.config.hub.endpoint}: {type(exc).__name__}",
                    reason="HUB_UNAVAILABLE",
                ) from None
            raise
        siblings = list(
            filter_repo_objects(
                info.siblings or [],
                allow_patterns=job.allow_patterns or None,
                ignore_patterns=job.ignore_patterns or None,
                key=lambda s: s.rfilename,
            )
        )
        if not siblings:
            raise FailedPrecondition(
                f"no file of {job.repo_id} matches the patterns", reason="NO_FILES_MATCH"
            )
        job.revision = info.sha or job.requested_revision
        if getattr(info, "gated", False):
            # A gated repo lists its files to anyone and refuses their bodies: ask for one now,
            # so a caller without access hears it from DownloadModel, not from a failed job.
            await self._probe_access(job, siblings[0].rfilename)
        job.files = [(s.rfilename, int(s.size or 0)) for s in siblings]
        # The names their blobs get in the cache: the sha256 of an LFS file, else the git blob id.
        job.blobs = [
            etag
            for s in siblings
            if (etag := (s.lfs.sha256 if s.lfs is not None else s.blob_id) or "")
        ]
        job.total_files = len(job.files)
        job.total_bytes = sum(size for _, size in job.files)
        job.path = str(self._target(job))
        job.snapshot_existed = await asyncio.to_thread(Path(job.path).exists)

    async def _probe_access(self, job: DownloadJob, filename: str) -> None:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import GatedRepoError

        url = hf_hub_url(
            job.repo_id, filename, revision=job.revision, endpoint=self.config.hub.endpoint
        )
        try:
            await asyncio.to_thread(
                get_hf_file_metadata, url, token=self._token(), timeout=self.config.hub.timeout_s
            )
        except GatedRepoError:
            raise PermissionDenied(
                f"{job.repo_id} is gated: accept its terms on the Hub and set a token with "
                f"access in ${self.config.hub.token_env}",
                reason="REPO_GATED",
                metadata={"repo_id": job.repo_id},
            ) from None
        except Exception as exc:
            raise _transfer_error(exc) from None

    def _target(self, job: DownloadJob) -> Path:
        if self.config.downloads_dir is not None:
            # One folder per commit: two revisions of a repo never share (or delete) files.
            return Path(self.config.downloads_dir) / job.repo_id / job.revision
        folder = "models--" + job.repo_id.replace("/", "--")
        return Path(self.config.hf_cache) / folder / "snapshots" / job.revision

    async def _reserve(self, job: DownloadJob) -> None:
        if self.space is None:
            return
        from pluggably.storage.budget import Category

        needed = job.total_bytes
        if job.snapshot_existed:  # files already there take no new space
            needed = max(0, needed - await asyncio.to_thread(_tree_bytes, Path(job.path)))
        candidates = await self.space.candidates([Category.MODELS])
        self._reservations[job.id] = await self.space.budget.reserve(
            Category.MODELS, needed, candidates, evict=self.space.remove
        )

    def _register_downloading(self, job: DownloadJob) -> None:
        from pluggably.catalog.registry import ModelRecord

        self.models.registry.put(
            ModelRecord(
                name=job.name,
                source=ModelSource.DOWNLOAD,
                modality=Modality.TEXT,  # known once the files are here
                path=job.path,
                state=ModelState.DOWNLOADING,
                source_repo=job.repo_id,
                source_revision=job.requested_revision,
                resolved_revision=job.revision,
                size_bytes=job.total_bytes,
                pinned=job.pinned,
                owned=True,
            )
        )

    def _forget_model(self, job: DownloadJob) -> None:
        record = self.models.registry.get(job.name)
        if record is not None and record.state is ModelState.DOWNLOADING:
            self.models.registry.remove(job.name)

    def _save(self, job: DownloadJob) -> None:
        job.updated_at = time.time()
        self.models.registry.save_download(
            job.id, job.state, self._owner, job.created_at, job.document()
        )

    def _changed_now(self, job: DownloadJob) -> None:
        job.version += 1
        event = self._changed.get(job.id)
        if event is not None:
            event.set()

    async def _run(self, job: DownloadJob) -> None:
        reservation = self._reservations.pop(job.id, None)
        try:
            async with self._slots:
                job.check()  # cancelled while it waited for the slot
                job.state = RUNNING
                self._save(job)
                self._changed_now(job)
                progress = asyncio.create_task(self._report(job))
                transfer = asyncio.ensure_future(asyncio.to_thread(self._transfer, job))
                try:
                    await asyncio.shield(transfer)
                except asyncio.CancelledError:
                    # Shutdown: stop the thread and let it finish writing before cleaning up,
                    # or a file it completes afterwards would stay behind unregistered.
                    job.cancel_event.set()
                    with contextlib.suppress(BaseException):
                        await transfer
                    raise
                finally:
                    progress.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await progress
            await self._finish(job)
            if reservation is not None:
                reservation.commit(job.total_bytes)
        except (DownloadCancelled, asyncio.CancelledError) as exc:
            job.state = CANCELLED
            job.error = Cancelled("the download was cancelled", reason="DOWNLOAD_CANCELLED")
            await self._undo(job, reservation)
            if isinstance(exc, asyncio.CancelledError) and not job.cancel_event.is_set():
                raise
        except Exception as exc:
            job.state = FAILED
            job.error = _transfer_error(exc)
            if not isinstance(exc, PluggablyError):
                log.warning("download %s of %s failed: %r", job.id, job.repo_id, exc)
            await self._undo(job, reservation)
        finally:
            job.bytes_per_second, job.eta_s = 0.0, None
            self._save(job)
            self._changed_now(job)
            self._tasks.pop(job.id, None)
            self._trim()

    async def _undo(self, job: DownloadJob, reservation: Reservation | None) -> None:
        if reservation is not None:
            reservation.release()
        await asyncio.to_thread(self._clean, job)
        self._forget_model(job)

    def _transfer(self, job: DownloadJob) -> None:
        """In a worker thread: fetches the files one by one."""
        from huggingface_hub import hf_hub_download

        _install_transport()
        token = self._token()
        local_dir = self.config.downloads_dir
        _current.job = job
        try:
            for filename, size in job.files:
                job.check()
                _current.file = filename
                hf_hub_download(
                    job.repo_id,
                    filename,
                    revision=job.revision,
                    cache_dir=None if local_dir else self.config.hf_cache,
                    local_dir=job.path if local_dir else None,
                    endpoint=self.config.hub.endpoint,
                    token=token,
                    etag_timeout=self.config.hub.timeout_s,
                )
                job.file_progress.pop(filename, None)
                job.done_bytes += size
                job.downloaded_files += 1
        finally:
            _current.job = None
            _current.file = None
        if not local_dir and job.requested_revision != job.revision:
            # What snapshot_download does: the branch or tag now points at this commit.
            refs = Path(job.path).parent.parent / "refs" / job.requested_revision
            refs.parent.mkdir(parents=True, exist_ok=True)
            refs.write_text(job.revision)

    async def _report(self, job: DownloadJob) -> None:
        ticks = 0
        while True:
            self._update_progress(job)
            self._changed_now(job)
            ticks += 1
            if ticks % 5 == 0:
                self._save(job)  # other processes watching it see the progress
                if self.models.registry.cancel_requested(job.id):
                    job.cancel_event.set()
            await asyncio.sleep(_NOTIFY_EVERY_S)

    def _update_progress(self, job: DownloadJob) -> None:
        done = job.done_bytes + sum(job.file_progress.values())
        job.downloaded_bytes = min(done, job.total_bytes) if job.total_bytes else done
        now = time.monotonic()
        job.samples.append((now, job.downloaded_bytes))
        while job.samples and now - job.samples[0][0] > _RATE_WINDOW_S:
            job.samples.popleft()
        first_t, first_b = job.samples[0]
        if now - first_t > 0.5:
            job.bytes_per_second = max(0.0, (job.downloaded_bytes - first_b) / (now - first_t))
        left = job.total_bytes - job.downloaded_bytes
        job.eta_s = left / job.bytes_per_second if job.bytes_per_second > 0 else None

    async def _finish(self, job: DownloadJob) -> None:
        from pluggably.catalog.discovery import scan
        from pluggably.catalog.registry import ModelRecord

        job.downloaded_bytes = job.total_bytes
        job.downloaded_files = job.total_files
        if self.config.downloads_dir is not None:
            found = await asyncio.to_thread(scan, [Path(job.path)], None)
        else:  # a snapshot's files link into the repo's blobs: scanned as the cache it is in
            found = [
                m
                for m in await asyncio.to_thread(scan, [], Path(self.config.hf_cache))
                if m.source_repo == job.repo_id and m.revision == job.revision
            ]
        model = found[0] if found else None
        record = self.models.registry.get(job.name)
        base = record or ModelRecord(
            name=job.name, source=ModelSource.DOWNLOAD, modality=Modality.TEXT, path=job.path
        )
        if model is None:
            state, reason = ModelState.UNSERVABLE, "no model found in the downloaded files"
            updated = dataclasses.replace(base, state=state, state_reason=reason)
        else:
            updated = dataclasses.replace(
                base,
                path=str(model.path),
                format=model.format,
                modality=model.modality,
                state=ModelState.AVAILABLE if model.servable else ModelState.UNSERVABLE,
                state_reason=model.reason,
                size_bytes=model.size_bytes,
            )
        self.models.registry.put(updated)
        job.state = SUCCEEDED
        log.info("download %s of %s done: local/%s", job.id, job.repo_id, job.name)

    def _clean(self, job: DownloadJob) -> None:
        """Removes what an unfinished job left: partial blobs, and the snapshot (or folder) if
        it did not exist before the job."""
        if self.config.downloads_dir is not None:
            target = Path(job.path)
            if not job.snapshot_existed and target.exists():
                shutil.rmtree(target, ignore_errors=True)
            return
        repo_dir = Path(self.config.hf_cache) / ("models--" + job.repo_id.replace("/", "--"))
        blobs = repo_dir / "blobs"
        if blobs.is_dir():
            for etag in job.blobs:  # this job's files only: others may be downloading theirs
                for partial in blobs.glob(f"{glob.escape(etag)}*.incomplete"):
                    with contextlib.suppress(FileNotFoundError):
                        partial.unlink()
        shared = any(
            other is not job
            and not other.ended
            and other.repo_id == job.repo_id
            and other.revision == job.revision
            for other in self._jobs.values()
        ) or any(
            doc.get("id") != job.id
            and doc.get("repo_id") == job.repo_id
            and doc.get("revision") == job.revision
            for doc in self.models.registry.downloads(states=ACTIVE)
        )
        if not shared and not job.snapshot_existed and job.revision and Path(job.path).exists():
            from pluggably.catalog.manager import delete_cache_revision

            try:
                delete_cache_revision(Path(self.config.hf_cache), job.repo_id, job.revision)
            except Exception:  # best effort: a later rescan or prune sees what is left
                log.warning("could not remove the partial snapshot of %s", job.repo_id)

    def _trim(self) -> None:
        ended = [j for j in self._jobs.values() if j.ended]
        for job in sorted(ended, key=lambda j: j.updated_at)[:-_KEEP_ENDED]:
            self._jobs.pop(job.id, None)
            self._changed.pop(job.id, None)


def _transfer_error(exc: BaseException) -> PluggablyError:
    if isinstance(exc, PluggablyError):
        return exc
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError

    if isinstance(exc, GatedRepoError):
        return PermissionDenied("the repository is gated for this token", reason="REPO_GATED")
    if isinstance(exc, EntryNotFoundError):
        return FailedPrecondition(
            "a file of the repository went missing during the download",
            reason="REPO_FILE_MISSING",
        )
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        return Unavailable(f"the Hub answered {status}; retry later", reason="HUB_UNAVAILABLE")
    if isinstance(exc, OSError) and not type(exc).__module__.startswith("httpx"):
        return FailedPrecondition(
            f"writing the files failed: {exc.strerror or type(exc).__name__}",
            reason="DOWNLOAD_WRITE_FAILED",
        )
    return Unavailable(
        f"the transfer from the Hub broke off ({type(exc).__name__}); retry",
        reason="HUB_TRANSFER_FAILED",
    )


def _tree_bytes(path: Path) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


class _OwnerLock:
    """Says whether the server process that owns a job still lives: each process holds an
    exclusive lock on a file named after its owner id while it runs; the lock goes with the
    process, however it ends."""

    def __init__(self, folder: Path, owner: str) -> None:
        self.folder = folder
        self.owner = owner
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.folder / f"{self.owner}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.folder / f"{self.owner}.lock")
            os.close(self._fd)
            self._fd = None

    def alive(self, owner: str) -> bool:
        import fcntl

        if not re.fullmatch(r"[0-9a-f]{32}", owner or ""):
            return False  # not an owner id this version writes
        path = self.folder / f"{owner}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()  # the owner is gone: its lock file with it
        return False
