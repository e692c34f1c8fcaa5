"""The artifact store: generated files (images, meshes) kept by content, listed, read, expired.

`ArtifactStore` is the seam; `FilesystemArtifactStore` is the default, a directory on local disk.
Nothing here knows about gRPC: the StorageService servicer converts `ArtifactInfo` to the proto
and maps the domain errors raised here (`InvalidArgument`, `ArtifactNotFound`) to statuses.

Key design decisions:

- Content addressing. An artifact's id is the lowercase hex SHA-256 of its bytes, so the same
  bytes stored twice are one file and one id; the later put may extend the expiry (never shorten
  it). Ids are checked against `^[0-9a-f]{64}$` before any path is built from them, which is
  what keeps a client-supplied id from reaching outside the store.
- Files and metadata. Bytes live at `root/<id[:2]>/<id[2:4]>/<id>`; metadata lives in one SQLite
  table (`root/index.db`, WAL, versioned migrations in `PRAGMA user_version`), with portable types
  so that the same table can live in PostgreSQL. The table, not the directory, is the truth for
  listing and accounting: a directory walk happens only at open, to reconcile after a crash.
- Crash safety. Bytes are written to a temporary file under `root/tmp/`, fsynced, then renamed
  into place with `os.replace`, so a file under its final name is always whole. Every store
  instance (each process sharing the root has its own) writes into a private `tmp/<token>/`
  whose `tmp/<token>.lock` it holds with `flock` while open: at open, a store removes only the
  temporary files of instances whose lock is free, that is, that died, never those of a live
  process.
- Concurrency. Every change to a file under its final name (rename in, unlink) happens inside
  the SQLite write transaction that changes its row, so all processes sharing the root see files
  and rows change together: a delete racing a put of the same bytes cannot unlink the file the
  put has just recorded. Reads use a second connection and never wait behind a long write.
  Blocking work (hashing, writing, fsync, SQLite, directory walks) runs in threads.
- Pagination is keyset on `(created, id)`, newest first; the page token (the project's opaque
  format, `pluggably.api.pagination`, bound to the filters) carries the last position, so inserts
  between pages neither repeat nor skip anything.

An object store (S3, GCS, MinIO) implements the same interface with the id as the object key
(`artifacts/<id>`, or sharded like the directory layout), the small metadata fields as object
metadata for `get`, and a conditional put (`If-None-Match: *`) for dedup. Listing newest first
with filters, usage totals and retention need an index that object listings do not give
(they are ordered by key): keep the `artifacts` table in PostgreSQL beside the bucket, written
after the object upload and removed before the object delete, with a reconcile pass like
`_reconcile` here; or let a bucket lifecycle rule do expiry and treat a missing object as not
found. `read` with ranges maps onto ranged GETs.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import enum
import errno
import fcntl
import hashlib
import logging
import math
import os
import re
import secrets
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self, TypeAlias

from pluggably.api.pagination import check_page_size, decode_page_token, encode_page_token
from pluggably.core import sqlite as sqlite_store
from pluggably.core.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)

log = logging.getLogger("pluggably.storage.artifacts")

ARTIFACT_KINDS: Final = ("image", "mesh", "other")
# One gRPC message per chunk: well under the 4 MiB default message limit, and large enough that
# the per-chunk thread hop is a small part of the cost.
DEFAULT_CHUNK_SIZE: Final = 256 * 1024
_HASH_BLOCK = 1024 * 1024
_BUSY_TIMEOUT_MS = 10_000
_ID = re.compile(r"[0-9a-f]{64}")
_SHARD = re.compile(r"[0-9a-f]{2}")
_LOCK_SUFFIX = ".lock"
_LIST_RPC = "ListArtifacts"

# Ordered schema migrations: migration i (0-based) brings the index from version i to i + 1,
# recorded in `PRAGMA user_version`. Append; never edit a released entry. Types and statements
# stay portable so that the same table can live in PostgreSQL later.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE artifacts (
            id CHAR(64) PRIMARY KEY,
            kind TEXT NOT NULL,
            mime_type TEXT NOT NULL,
            size_bytes BIGINT NOT NULL,
            model TEXT NOT NULL,
            request_id TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION
        )
        """,
        # Listing (newest first, keyset) and eviction (oldest first) walk this index.
        "CREATE INDEX artifacts_by_created ON artifacts (created_at, id)",
        "CREATE INDEX artifacts_by_model ON artifacts (model, created_at, id)",
        "CREATE INDEX artifacts_by_expiry ON artifacts (expires_at) WHERE expires_at IS NOT NULL",
    ),
)

_COLUMNS = "id, kind, mime_type, size_bytes, model, request_id, created_at, expires_at"
_VISIBLE = "(expires_at IS NULL OR expires_at > ?)"

_Row = tuple[str, str, str, int, str, str, float, float | None]


class _Default(enum.Enum):
    TTL = "default"


# `put(..., ttl_s=DEFAULT_TTL)`: the store's default_ttl_s. (None means "never expires".)
DEFAULT_TTL: Final = _Default.TTL
TTL: TypeAlias = float | Literal[_Default.TTL] | None


class ArtifactStoreError(Exception):
    """The store cannot be opened (unreadable index, or one written by a newer pluggably)."""


class ArtifactNotFound(NotFound):
    """No artifact has this id, or it has expired."""

    reason = "ARTIFACT_NOT_FOUND"

    def __init__(self, artifact_id: str) -> None:
        super().__init__(
            f"artifact {artifact_id} does not exist or has expired",
            resource_type="artifact",
            resource_name=artifact_id,
        )


@dataclass(frozen=True, slots=True)
class ArtifactInfo:
    """What the store knows about one artifact."""

    # Lowercase hex SHA-256 of the content.
    id: str
    # One of ARTIFACT_KINDS.
    kind: str
    mime_type: str
    size_bytes: int
    model: str
    request_id: str
    # Epoch seconds.
    created: float
    # Epoch seconds; None: never expires.
    expires: float | None

    def expired(self, now: float) -> bool:
        return self.expires is not None and self.expires <= now


def check_artifact_id(artifact_id: str) -> str:
    """`artifact_id` if it is 64 lowercase hex characters; InvalidArgument on `id` otherwise."""
    # fullmatch, not match with `$`: `$` also matches before a trailing newline.
    if not isinstance(artifact_id, str) or _ID.fullmatch(artifact_id) is None:
        raise InvalidArgument(
            [FieldViolation("id", "must be 64 lowercase hexadecimal characters (a SHA-256)")]
        )
    return artifact_id


class ArtifactStore(abc.ABC):
    """Generated files by content hash, with metadata and retention.

    Errors for clients are domain errors: `InvalidArgument` (with a FieldViolation) for a bad
    id, range, page token, page size or filter; `ArtifactNotFound` (a `NotFound`) for an id that
    is missing or expired; `Unavailable` after `close()`. Bad arguments from server code (an
    unknown kind, a non-positive TTL) raise ValueError.
    """

    @abc.abstractmethod
    async def put(
        self,
        data: bytes,
        *,
        kind: str,
        mime_type: str,
        model: str,
        request_id: str,
        ttl_s: TTL = DEFAULT_TTL,
    ) -> ArtifactInfo:
        """Stores `data`; the same bytes stored again return the existing record, its expiry
        extended when this put's is later (a put never shortens it)."""

    @abc.abstractmethod
    async def put_file(
        self,
        path: Path | str,
        *,
        kind: str,
        mime_type: str,
        model: str,
        request_id: str,
        ttl_s: TTL = DEFAULT_TTL,
    ) -> ArtifactInfo:
        """Like `put`, for a file already written: the store takes it over (moved in when it can
        be, copied otherwise), and it is gone from `path` afterwards. The caller must not write
        to it any more."""

    @abc.abstractmethod
    async def get(self, artifact_id: str) -> ArtifactInfo:
        """The record of a live artifact; ArtifactNotFound when missing or expired."""

    @abc.abstractmethod
    def read(
        self,
        artifact_id: str,
        *,
        offset: int = 0,
        length: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> AsyncGenerator[bytes, None]:
        """The bytes `[offset, offset + length)` (to the end when `length` is None) in chunks of
        at most `chunk_size`. Errors (bad id or range, not found) are raised by the first
        iteration, before any bytes. Close the iterator (`contextlib.aclosing`) when stopping
        early."""

    @abc.abstractmethod
    async def list(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        model: str | None = None,
        kind: str | None = None,
    ) -> tuple[builtins.list[ArtifactInfo], str]:
        """One page of live artifacts, newest first, and the token of the next page ("" on the
        last). `page_size` 0 means the default (100); at most 1000. An empty `model` or `kind`
        does not filter. A token works only with the filters it was issued for."""

    @abc.abstractmethod
    async def delete(self, artifact_id: str) -> int:
        """Removes an artifact (expired or not); returns the bytes freed. ArtifactNotFound when
        there is no such artifact."""

    @abc.abstractmethod
    async def usage(self) -> tuple[int, int]:
        """(bytes, count) of everything stored, including expired artifacts not yet removed:
        they still occupy the disk."""

    @abc.abstractmethod
    async def expire(self, now: float | None = None) -> builtins.list[ArtifactInfo]:
        """Removes artifacts expired at `now` (default: the store's clock); returns them."""

    @abc.abstractmethod
    async def evict_to(self, max_bytes: int) -> builtins.list[ArtifactInfo]:
        """Removes the oldest artifacts until the total is at most `max_bytes`; returns them,
        oldest first."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Releases the store; further calls raise Unavailable. Idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# -- helpers -----------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(ARTIFACT_KINDS)}, not {kind!r}")


def _check_ttl(ttl_s: float | None, name: str) -> None:
    if ttl_s is not None and not (ttl_s > 0 and math.isfinite(ttl_s)):
        raise ValueError(f"{name} must be a positive number of seconds or None, not {ttl_s!r}")


def _later(first: float | None, second: float | None) -> float | None:
    """The later of two expiries, None (never) being the latest."""
    if first is None or second is None:
        return None
    return max(first, second)


def _info(row: _Row) -> ArtifactInfo:
    return ArtifactInfo(
        id=row[0],
        kind=row[1],
        mime_type=row[2],
        size_bytes=int(row[3]),
        model=row[4],
        request_id=row[5],
        created=float(row[6]),
        expires=None if row[7] is None else float(row[7]),
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_and_sync(path: Path) -> tuple[str, int]:
    """(hex SHA-256, size) of a file, after fsyncing it."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
        os.fsync(handle.fileno())
    return digest.hexdigest(), size


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_tree_or_file(path: Path) -> None:
    """Removes what is at `path` without following a symlink anywhere."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        _unlink_quietly(path)


def _position(info: ArtifactInfo) -> str:
    # repr(float) round-trips exactly, so the keyset comparison resumes at the same row.
    return f"{info.created!r} {info.id}"


def _parse_position(position: str) -> tuple[float, str] | None:
    created_text, _, artifact_id = position.partition(" ")
    if _ID.fullmatch(artifact_id) is None:
        return None
    try:
        created = float(created_text)
    except ValueError:
        return None
    return (created, artifact_id) if math.isfinite(created) else None


class _TempArea:
    """This instance's private `tmp/<token>/`, held by an `flock` on `tmp/<token>.lock`.

    `flock` locks belong to the open file, so a second instance in the same process is refused
    like another process would be, and the kernel drops the lock when a process dies: a free
    lock means a dead owner whose temporary files may go.
    """

    def __init__(self, tmp_root: Path) -> None:
        for _ in range(10):
            token = secrets.token_hex(8)
            lock_path = tmp_root / (token + _LOCK_SUFFIX)
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Another instance's reaper may have locked and unlinked the new file between
                # our create and our flock: then the lock we hold is on nothing. Draw again.
                if os.fstat(fd).st_ino != os.lstat(lock_path).st_ino:
                    raise FileNotFoundError(lock_path)
            except OSError:
                os.close(fd)
                continue
            self.lock_path = lock_path
            self.directory = tmp_root / token
            self._fd: int | None = fd
            self.directory.mkdir()
            return
        raise ArtifactStoreError(f"cannot create a temporary area under {tmp_root}")

    def new_path(self) -> Path:
        return self.directory / secrets.token_hex(12)

    def release(self) -> None:
        if self._fd is None:
            return
        shutil.rmtree(self.directory, ignore_errors=True)
        _unlink_quietly(self.lock_path)
        os.close(self._fd)
        self._fd = None

    @staticmethod
    def reap(tmp_root: Path) -> int:
        """Removes what dead instances left under `tmp_root`; returns how many entries."""
        removed = 0
        with os.scandir(tmp_root) as entries:
            names = {entry.name for entry in entries}
        for name in sorted(names):
            path = tmp_root / name
            if name.endswith(_LOCK_SUFFIX):
                try:
                    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
                except OSError:
                    _remove_tree_or_file(path)  # gone meanwhile, or a symlink: not ours
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue  # a live instance holds it
                try:
                    _remove_tree_or_file(tmp_root / name[: -len(_LOCK_SUFFIX)])
                    _unlink_quietly(path)
                    removed += 1
                finally:
                    os.close(fd)
            elif name + _LOCK_SUFFIX not in names:
                # A private area is created after its lock file and removed before it, so an
                # area without one was left by a dead instance; anything else here is a stray.
                if not (tmp_root / (name + _LOCK_SUFFIX)).exists():
                    _remove_tree_or_file(path)
                    removed += 1
        return removed


# -- the filesystem store ----------------------------------------------------------------------


class FilesystemArtifactStore(ArtifactStore):
    """Artifacts in a local directory; several processes may share one root.

    The constructor opens, migrates and reconciles synchronously (use it at start-up, or
    `await FilesystemArtifactStore.open(...)` from a running event loop).
    """

    def __init__(
        self,
        root: Path | str,
        *,
        default_ttl_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_ttl(default_ttl_s, "default_ttl_s")
        self.root = Path(root)
        self.default_ttl_s = default_ttl_s
        self._clock = clock
        self._closed = False
        # One lock per connection: an sqlite3 connection must not be used by two threads at once.
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        tmp_root = self.root / "tmp"
        try:
            tmp_root.mkdir(parents=True, exist_ok=True)
            self._root_real = os.path.realpath(self.root)
        except OSError as exc:
            raise ArtifactStoreError(f"cannot open artifact store {self.root}: {exc}") from None
        self._write = self._connect()
        try:
            self._migrate()
            self._read = self._connect()
        except BaseException:
            self._write.close()
            raise
        try:
            self._temp = _TempArea(tmp_root)
        except BaseException:
            self._write.close()
            self._read.close()
            raise
        try:
            self._reconcile(tmp_root)
        except BaseException:
            self._close_now()
            raise

    @classmethod
    async def open(
        cls,
        root: Path | str,
        *,
        default_ttl_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> FilesystemArtifactStore:
        """Opens a store without blocking the event loop (the reconcile walk may be long)."""
        return await asyncio.to_thread(cls, root, default_ttl_s=default_ttl_s, clock=clock)

    # -- opening ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # NORMAL in WAL mode survives a process crash; a power cut may lose the last commits,
        # and the reconcile at open then removes their (fsynced) orphan files.
        try:
            return sqlite_store.connect(
                self.root / "index.db", what="artifact index", busy_timeout_ms=_BUSY_TIMEOUT_MS
            )
        except sqlite_store.SchemaError as exc:
            raise ArtifactStoreError(str(exc)) from None

    def _migrate(self) -> None:
        try:
            sqlite_store.migrate(
                self._write, MIGRATIONS, what="artifact index", path=self.root / "index.db"
            )
        except sqlite_store.SchemaError as exc:
            raise ArtifactStoreError(str(exc)) from None

    def _reconcile(self, tmp_root: Path) -> None:
        """Brings files and rows back in step after a crash (this or another process's).

        The walk and the existence checks run without the write lock (a large store takes a
        while); each repair is then re-checked inside a write transaction, because another
        process may have put or deleted the same artifact meanwhile.
        """
        reaped = _TempArea.reap(tmp_root)
        known = {row[0] for row in self._read.execute("SELECT id FROM artifacts")}
        stray_files = [
            path
            for path in self._object_files()
            if path.name not in known or path != self._object_path(path.name)
        ]
        missing = [aid for aid in known if not self._object_present(aid)]
        dropped = removed = 0
        if stray_files or missing:
            with self._transaction() as conn:
                for path in stray_files:
                    in_place = _ID.fullmatch(path.name) is not None and path == self._object_path(
                        path.name
                    )
                    if in_place and self._row(conn, path.name) is not None:
                        continue  # put by another process since the walk
                    _unlink_quietly(path)
                    removed += 1
                for artifact_id in missing:
                    if not self._object_present(artifact_id):
                        self._remove_object(artifact_id)  # a symlink squatting its place
                        deleted = conn.execute("DELETE FROM artifacts WHERE id = ?", (artifact_id,))
                        dropped += deleted.rowcount
        if reaped or removed or dropped:
            log.warning(
                "artifact store reconciled: %d temporary leftovers removed, %d files without a "
                "record removed, %d records without a file dropped",
                reaped,
                removed,
                dropped,
            )

    def _object_files(self) -> Iterator[Path]:
        """Every non-directory entry at the object depth (`root/xx/yy/*`); symlinked shard
        directories are not entered."""
        with os.scandir(self.root) as level1:
            first = [
                e for e in level1 if _SHARD.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
            ]
        for outer in first:
            with os.scandir(outer.path) as level2:
                second = [
                    e
                    for e in level2
                    if _SHARD.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
                ]
            for inner in second:
                with os.scandir(inner.path) as objects:
                    for entry in objects:
                        if not entry.is_dir(follow_symlinks=False):
                            yield Path(entry.path)

    # -- paths -----------------------------------------------------------------------------

    def _object_path(self, artifact_id: str) -> Path:
        return self.root / artifact_id[:2] / artifact_id[2:4] / artifact_id

    def _inside_root(self, directory: Path) -> bool:
        """Whether `directory`, symlinks resolved, is inside the store's root."""
        real = os.path.realpath(directory)
        return os.path.commonpath([real, self._root_real]) == self._root_real

    def _object_present(self, artifact_id: str) -> bool:
        """Whether the artifact's file is a regular file inside root (a symlink is not)."""
        path = self._object_path(artifact_id)
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return False
        return stat.S_ISREG(mode) and self._inside_root(path.parent)

    # -- SQLite ----------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, under the write lock: file renames and unlinks done inside it
        are seen by other processes together with the row change."""
        with self._write_lock:
            self._check_open()
            self._write.execute("BEGIN IMMEDIATE")
            try:
                yield self._write
            except BaseException:
                self._write.execute("ROLLBACK")
                raise
            self._write.execute("COMMIT")

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the artifact store is closed")

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> builtins.list[_Row]:
        with self._read_lock:
            self._check_open()
            return self._read.execute(sql, params).fetchall()

    @staticmethod
    def _row(conn: sqlite3.Connection, artifact_id: str) -> _Row | None:
        row: _Row | None = conn.execute(
            f"SELECT {_COLUMNS} FROM artifacts WHERE id = ?", (artifact_id,)
        ).fetchone()
        return row

    def _ttl(self, ttl_s: TTL) -> float | None:
        if ttl_s is DEFAULT_TTL:
            return self.default_ttl_s
        _check_ttl(ttl_s, "ttl_s")
        return ttl_s

    # -- writing ---------------------------------------------------------------------------

    def _commit_temp(
        self,
        temp: Path,
        artifact_id: str,
        size: int,
        *,
        kind: str,
        mime_type: str,
        model: str,
        request_id: str,
        ttl_s: float | None,
    ) -> ArtifactInfo:
        """Records a whole, fsynced temporary file as artifact `artifact_id`: renamed into place,
        or dropped when the store already holds these bytes."""
        final = self._object_path(artifact_id)
        with self._transaction() as conn:
            now = self._clock()
            expires = None if ttl_s is None else now + ttl_s
            row = self._row(conn, artifact_id)
            if row is not None:
                existing = _info(row)
                if not existing.expired(now) and self._object_present(artifact_id):
                    later = _later(existing.expires, expires)
                    if later != existing.expires:
                        conn.execute(
                            "UPDATE artifacts SET expires_at = ? WHERE id = ?",
                            (later, artifact_id),
                        )
                    _unlink_quietly(temp)
                    return replace(existing, expires=later)
            # New, or an expired record not yet removed (stored anew, as of now), or a record
            # whose file went missing (the bytes are restored).
            final.parent.mkdir(parents=True, exist_ok=True)
            if not self._inside_root(final.parent):
                raise FailedPrecondition(
                    "the artifact store's directory layout was tampered with",
                    reason="ARTIFACT_STORE_DAMAGED",
                )
            os.replace(temp, final)
            _fsync_dir(final.parent)
            info = ArtifactInfo(
                id=artifact_id,
                kind=kind,
                mime_type=mime_type,
                size_bytes=size,
                model=model,
                request_id=request_id,
                created=now,
                expires=expires,
            )
            conn.execute(
                f"INSERT INTO artifacts ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?) "
                "ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, "
                "mime_type = excluded.mime_type, size_bytes = excluded.size_bytes, "
                "model = excluded.model, request_id = excluded.request_id, "
                "created_at = excluded.created_at, expires_at = excluded.expires_at",
                (
                    info.id,
                    info.kind,
                    info.mime_type,
                    info.size_bytes,
                    info.model,
                    info.request_id,
                    info.created,
                    info.expires,
                ),
            )
            return info

    def _put_bytes(self, data: bytes, ttl_s: float | None, **meta: str) -> ArtifactInfo:
        artifact_id = hashlib.sha256(data).hexdigest()
        temp = self._temp.new_path()
        try:
            with open(temp, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            return self._commit_temp(temp, artifact_id, len(data), ttl_s=ttl_s, **meta)
        finally:
            _unlink_quietly(temp)  # already renamed away on success

    def _put_file(self, source: Path, ttl_s: float | None, **meta: str) -> ArtifactInfo:
        if not stat.S_ISREG(os.lstat(source).st_mode):
            raise ValueError("put_file takes a regular file (not a directory or symlink)")
        temp = self._temp.new_path()
        moved = False
        try:
            # Into our own temporary area first: from here on the caller's path no longer
            # reaches the file, so what is hashed is what is stored.
            os.replace(source, temp)
            moved = True
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.copyfile(source, temp)
        try:
            artifact_id, size = _hash_and_sync(temp)
            info = self._commit_temp(temp, artifact_id, size, ttl_s=ttl_s, **meta)
        except BaseException:
            if moved:
                try:  # give the caller its file back
                    os.replace(temp, source)
                except OSError:
                    _unlink_quietly(temp)
            else:
                _unlink_quietly(temp)
            raise
        if not moved:
            _unlink_quietly(source)
        return info

    # -- removing --------------------------------------------------------------------------

    def _remove_object(self, artifact_id: str) -> bool:
        """Unlinks the artifact's file; never through a symlinked directory out of root.
        Call inside a write transaction. Whether a file was removed."""
        path = self._object_path(artifact_id)
        if not self._inside_root(path.parent):
            log.warning(
                "artifact %s: its directory leads outside the store; left alone", artifact_id
            )
            return False
        try:
            os.unlink(path)  # a symlink in the last component is itself removed, not followed
        except FileNotFoundError:
            return False
        return True

    def _delete(self, artifact_id: str) -> int:
        with self._transaction() as conn:
            row = self._row(conn, artifact_id)
            if row is None:
                raise ArtifactNotFound(artifact_id)
            # The file goes first: a crash between the two leaves a record without a file,
            # which reads as not found and is dropped at the next open.
            freed = int(row[3]) if self._remove_object(artifact_id) else 0
            conn.execute("DELETE FROM artifacts WHERE id = ?", (artifact_id,))
            return freed

    def _remove_rows(self, conn: sqlite3.Connection, rows: builtins.list[_Row]) -> None:
        for row in rows:
            self._remove_object(row[0])
            conn.execute("DELETE FROM artifacts WHERE id = ?", (row[0],))

    def _expire(self, now: float | None) -> builtins.list[ArtifactInfo]:
        with self._transaction() as conn:
            at = self._clock() if now is None else now
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM artifacts WHERE expires_at IS NOT NULL "
                "AND expires_at <= ? ORDER BY expires_at, id",
                (at,),
            ).fetchall()
            self._remove_rows(conn, rows)
            return [_info(row) for row in rows]

    def _evict_to(self, max_bytes: int) -> builtins.list[ArtifactInfo]:
        with self._transaction() as conn:
            total = conn.execute("SELECT COALESCE(SUM(size_bytes), 0) FROM artifacts").fetchone()[0]
            victims: builtins.list[_Row] = []
            if total > max_bytes:
                cursor = conn.execute(f"SELECT {_COLUMNS} FROM artifacts ORDER BY created_at, id")
                for row in cursor:
                    victims.append(row)
                    total -= int(row[3])
                    if total <= max_bytes:
                        break
                cursor.close()
            self._remove_rows(conn, victims)
            return [_info(row) for row in victims]

    # -- the interface ---------------------------------------------------------------------

    async def put(
        self,
        data: bytes,
        *,
        kind: str,
        mime_type: str,
        model: str,
        request_id: str,
        ttl_s: TTL = DEFAULT_TTL,
    ) -> ArtifactInfo:
        _check_kind(kind)
        ttl = self._ttl(ttl_s)
        self._check_open()
        return await asyncio.to_thread(
            self._put_bytes,
            data,
            ttl,
            kind=kind,
            mime_type=mime_type,
            model=model,
            request_id=request_id,
        )

    async def put_file(
        self,
        path: Path | str,
        *,
        kind: str,
        mime_type: str,
        model: str,
        request_id: str,
        ttl_s: TTL = DEFAULT_TTL,
    ) -> ArtifactInfo:
        _check_kind(kind)
        ttl = self._ttl(ttl_s)
        self._check_open()
        return await asyncio.to_thread(
            self._put_file,
            Path(path),
            ttl,
            kind=kind,
            mime_type=mime_type,
            model=model,
            request_id=request_id,
        )

    async def get(self, artifact_id: str) -> ArtifactInfo:
        check_artifact_id(artifact_id)
        rows = await asyncio.to_thread(
            self._query,
            f"SELECT {_COLUMNS} FROM artifacts WHERE id = ? AND {_VISIBLE}",
            (artifact_id, self._clock()),
        )
        if not rows:
            raise ArtifactNotFound(artifact_id)
        return _info(rows[0])

    async def read(
        self,
        artifact_id: str,
        *,
        offset: int = 0,
        length: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> AsyncGenerator[bytes, None]:
        check_artifact_id(artifact_id)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        info = await self.get(artifact_id)
        violations: builtins.list[FieldViolation] = []
        if offset < 0 or offset > info.size_bytes:
            violations.append(
                FieldViolation("offset", f"must be in [0, {info.size_bytes}], got {offset}")
            )
        elif length is not None and (length < 0 or offset + length > info.size_bytes):
            violations.append(
                FieldViolation(
                    "length",
                    f"must be in [0, {info.size_bytes - offset}] at offset {offset}, got {length}",
                )
            )
        if violations:
            raise InvalidArgument(violations)
        fd = await asyncio.to_thread(self._open_object, artifact_id)
        try:
            position = offset
            end = info.size_bytes if length is None else offset + length
            while position < end:
                chunk = await asyncio.to_thread(
                    os.pread, fd, min(chunk_size, end - position), position
                )
                if not chunk:
                    log.error("artifact %s is shorter than its recorded size", artifact_id)
                    raise FailedPrecondition(
                        f"artifact {artifact_id} is damaged", reason="ARTIFACT_DAMAGED"
                    )
                position += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    def _open_object(self, artifact_id: str) -> int:
        path = self._object_path(artifact_id)
        if not self._inside_root(path.parent):
            raise ArtifactNotFound(artifact_id)
        try:
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            raise ArtifactNotFound(artifact_id) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink where the file should be: not ours
                raise ArtifactNotFound(artifact_id) from None
            raise

    async def list(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        model: str | None = None,
        kind: str | None = None,
    ) -> tuple[builtins.list[ArtifactInfo], str]:
        violations: builtins.list[FieldViolation] = []
        size = check_page_size(page_size, violations)
        if kind and kind not in ARTIFACT_KINDS:
            violations.append(FieldViolation("kind", f"must be one of {', '.join(ARTIFACT_KINDS)}"))
        filter_key = f"artifacts\x00{model or ''}\x00{kind or ''}"
        after: tuple[float, str] | None = None
        if page_token:
            position = decode_page_token(page_token, filter_key, violations, _LIST_RPC)
            after = _parse_position(position)
            if after is None and not violations:
                violations.append(
                    FieldViolation("page_token", f"not a token returned by {_LIST_RPC}")
                )
        if violations:
            raise InvalidArgument(violations)
        where = [_VISIBLE]
        params: builtins.list[object] = [self._clock()]
        if model:
            where.append("model = ?")
            params.append(model)
        if kind:
            where.append("kind = ?")
            params.append(kind)
        if after is not None:
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params.extend((after[0], after[0], after[1]))
        # One row more than the page tells whether there is a next page.
        params.append(size + 1)
        rows = await asyncio.to_thread(
            self._query,
            f"SELECT {_COLUMNS} FROM artifacts WHERE {' AND '.join(where)} "
            "ORDER BY created_at DESC, id DESC LIMIT ?",
            tuple(params),
        )
        page = [_info(row) for row in rows[:size]]
        token = encode_page_token(_position(page[-1]), filter_key) if len(rows) > size else ""
        return page, token

    async def delete(self, artifact_id: str) -> int:
        check_artifact_id(artifact_id)
        return await asyncio.to_thread(self._delete, artifact_id)

    async def usage(self) -> tuple[int, int]:
        rows = await asyncio.to_thread(
            self._query, "SELECT COALESCE(SUM(size_bytes), 0), COUNT(*) FROM artifacts"
        )
        total, count = rows[0][0], rows[0][1]
        return int(total), int(count)

    async def expire(self, now: float | None = None) -> builtins.list[ArtifactInfo]:
        return await asyncio.to_thread(self._expire, now)

    async def evict_to(self, max_bytes: int) -> builtins.list[ArtifactInfo]:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        return await asyncio.to_thread(self._evict_to, max_bytes)

    async def close(self) -> None:
        await asyncio.to_thread(self._close_now)

    def _close_now(self) -> None:
        # Both locks: a statement still running in a worker thread finishes first.
        with self._write_lock, self._read_lock:
            if self._closed:
                return
            self._closed = True
            self._temp.release()
            self._read.close()
            self._write.close()
