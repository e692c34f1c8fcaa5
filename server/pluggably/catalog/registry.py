"""The registry of local models: one SQLite table that config, downloads and discovery all write.

Every local model the gateway knows is one row: where its files are and where they came from,
its format and modality, its state (available, downloading, failed, deleting, unservable with
the reason), whether it is pinned, when it was created and last used. The local backend serves
what the registry says, so a model registered by a download or a rescan generates without a
restart, and ListModels shows config, downloaded and discovered models side by side.

SQLite in WAL mode with versioned migrations (`PRAGMA user_version`), like the key store: several
server processes may share one file. Reads are served from an in-memory copy that is reloaded when
another connection committed (`PRAGMA data_version`), so routing a request costs a statement, not
a query. Writes are short IMMEDIATE transactions. Columns and statements stay portable, so the same
table can live in PostgreSQL for a multi-replica deployment.

Rules for a name that several sources claim: config wins over a download, which wins over
discovery; a lower source never overwrites a higher one's row.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pluggably.core import sqlite as sqlite_store
from pluggably.core.errors import Unavailable
from pluggably.core.types import (
    LocalDetails,
    Modality,
    ModelFormat,
    ModelSource,
    ModelState,
)

log = logging.getLogger(__name__)


# Last-used times are advisory (eviction order, listings): written at most this often per model.
LAST_USED_RESOLUTION_S = 60.0
# Which source may overwrite which: a row is only replaced by its own source or a stronger one.
_SOURCE_RANK = {ModelSource.DISCOVERY: 0, ModelSource.DOWNLOAD: 1, ModelSource.CONFIG: 2}

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE models (
            name TEXT PRIMARY KEY,
            source TEXT NOT NULL,
            format TEXT,
            modality TEXT NOT NULL,
            path TEXT NOT NULL,
            state TEXT NOT NULL,
            state_reason TEXT NOT NULL DEFAULT '',
            source_repo TEXT NOT NULL DEFAULT '',
            source_revision TEXT NOT NULL DEFAULT '',
            resolved_revision TEXT NOT NULL DEFAULT '',
            size_bytes BIGINT NOT NULL DEFAULT 0,
            pinned INTEGER NOT NULL DEFAULT 0,
            owned INTEGER NOT NULL DEFAULT 0,
            description TEXT NOT NULL DEFAULT '',
            context_length INTEGER NOT NULL DEFAULT 0,
            settings TEXT NOT NULL DEFAULT '{}',
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            last_used_at DOUBLE PRECISION
        )
        """,
        "CREATE INDEX models_by_last_use ON models (last_used_at)",
    ),
    (
        # Download jobs: a JSON document per job (the job's own schema, versioned with it), with
        # the columns that lists and recovery filter on.
        """
        CREATE TABLE downloads (
            id TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            owner TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            document TEXT NOT NULL
        )
        """,
        "CREATE INDEX downloads_by_created ON downloads (created_at, id)",
    ),
    (
        # Set by any process; the job's owner polls it and stops the transfer.
        "ALTER TABLE downloads ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
    ),
)


class RegistryError(Exception):
    """The registry file cannot be opened or is from a newer version."""


@dataclass(frozen=True)
class ModelRecord:
    """One local model as the registry keeps it."""

    name: str
    source: ModelSource
    modality: Modality
    path: str
    state: ModelState = ModelState.AVAILABLE
    state_reason: str = ""
    format: ModelFormat | None = None
    source_repo: str = ""
    source_revision: str = ""
    resolved_revision: str = ""
    size_bytes: int = 0
    pinned: bool = False
    # Whether the gateway may delete the files: it downloaded them, or they are in a folder the
    # operator gave it. Models found elsewhere (the user's own Hugging Face cache) are not.
    owned: bool = False
    description: str = ""
    context_length: int = 0
    # Runner settings (device, dtype, concurrency...): what the config said for this model.
    settings: Mapping[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    last_used_at: float | None = None

    def details(self) -> LocalDetails:
        return LocalDetails(
            format=self.format,
            source=self.source,
            path=self.path,
            source_repo=self.source_repo,
            source_revision=self.source_revision,
            resolved_revision=self.resolved_revision,
            pinned=self.pinned,
            created_at=self.created_at or None,
            last_used_at=self.last_used_at,
        )


_COLUMNS = (
    "name",
    "source",
    "format",
    "modality",
    "path",
    "state",
    "state_reason",
    "source_repo",
    "source_revision",
    "resolved_revision",
    "size_bytes",
    "pinned",
    "owned",
    "description",
    "context_length",
    "settings",
    "created_at",
    "updated_at",
    "last_used_at",
)


def _to_row(record: ModelRecord) -> tuple[Any, ...]:
    return (
        record.name,
        record.source.value,
        record.format.value if record.format is not None else None,
        record.modality.value,
        record.path,
        record.state.value,
        record.state_reason,
        record.source_repo,
        record.source_revision,
        record.resolved_revision,
        int(record.size_bytes),
        int(record.pinned),
        int(record.owned),
        record.description,
        int(record.context_length),
        json.dumps(dict(record.settings), sort_keys=True, default=str),
        record.created_at,
        record.updated_at,
        record.last_used_at,
    )


def _from_row(row: Sequence[Any]) -> ModelRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    return ModelRecord(
        name=values["name"],
        source=ModelSource(values["source"]),
        format=ModelFormat(values["format"]) if values["format"] else None,
        modality=Modality(values["modality"]),
        path=values["path"],
        state=ModelState(values["state"]),
        state_reason=values["state_reason"],
        source_repo=values["source_repo"],
        source_revision=values["source_revision"],
        resolved_revision=values["resolved_revision"],
        size_bytes=int(values["size_bytes"]),
        pinned=bool(values["pinned"]),
        owned=bool(values["owned"]),
        description=values["description"],
        context_length=int(values["context_length"]),
        settings=json.loads(values["settings"] or "{}"),
        created_at=float(values["created_at"]),
        updated_at=float(values["updated_at"]),
        last_used_at=values["last_used_at"],
    )


class ModelRegistry:
    """The local models, persisted in one SQLite file (see the module docstring).

    Thread-safe: the event loop reads it, worker threads (downloads, scans) write it.
    """

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise RegistryError(f"cannot open model registry {self.path}: {exc.strerror}") from None
        try:
            self._conn = sqlite_store.connect(self.path, what="model registry")
        except sqlite_store.SchemaError as exc:
            raise RegistryError(str(exc)) from None
        try:
            sqlite_store.migrate(self._conn, MIGRATIONS, what="model registry", path=self.path)
        except sqlite_store.SchemaError as exc:
            self._conn.close()
            raise RegistryError(str(exc)) from None
        except BaseException:
            self._conn.close()
            raise
        self._closed = False
        self._records: dict[str, ModelRecord] = {}
        self._data_version = -1
        self._last_used_written: dict[str, float] = {}
        self._listeners: list[Callable[[], None]] = []
        self._refresh()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> ModelRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Reloads the in-memory copy if another connection committed since the last look
        (`data_version` does not change for this connection's own commits: `_reload` follows
        those)."""
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._reload(version)

    def _reload(self, version: int | None = None) -> None:
        if version is None:
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        rows = self._conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM models").fetchall()
        self._records = {}
        for row in rows:
            try:
                record = _from_row(row)
            except (ValueError, KeyError):  # a row written by a newer version: not ours to read
                log.warning("model registry: skipping unreadable row %r", row[0])
                continue
            self._records[record.name] = record
        self._data_version = version

    def all(self) -> list[ModelRecord]:
        """Every local model, ordered by name."""
        with self._lock:
            self._refresh()
            return sorted(self._records.values(), key=lambda r: r.name)

    def get(self, name: str) -> ModelRecord | None:
        with self._lock:
            self._refresh()
            return self._records.get(name)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Calls `listener` after every write made through this instance."""
        self._listeners.append(listener)

    # -- writing -------------------------------------------------------------------------------

    def _write(self, statements: Iterable[tuple[str, tuple[Any, ...]]]) -> None:
        """Runs `statements` in one transaction; UNAVAILABLE when another process holds the
        write lock for longer than the busy timeout."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    for sql, args in statements:
                        self._conn.execute(sql, args)
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                raise Unavailable(
                    f"the model registry is busy ({exc}); retry shortly",
                    retry_after_s=1.0,
                    reason="REGISTRY_BUSY",
                ) from None
            self._reload()
        for listener in self._listeners:
            listener()

    def put(self, record: ModelRecord) -> ModelRecord | None:
        """Inserts or replaces `record` unless a stronger source holds the name (then None).

        Keeps the existing row's creation time, pin and last use when the name is already known.
        """
        with self._lock:
            self._refresh()
            current = self._records.get(record.name)
            if current is not None and _SOURCE_RANK[current.source] > _SOURCE_RANK[record.source]:
                return None
            now = self._clock()
            stored = replace(
                record,
                created_at=current.created_at if current else (record.created_at or now),
                pinned=record.pinned or (current.pinned if current else False),
                last_used_at=current.last_used_at if current else record.last_used_at,
                updated_at=now,
            )
            placeholders = ", ".join("?" for _ in _COLUMNS)
            self._write(
                [
                    (
                        f"INSERT OR REPLACE INTO models ({', '.join(_COLUMNS)}) "
                        f"VALUES ({placeholders})",
                        _to_row(stored),
                    )
                ]
            )
            return stored

    def update(self, name: str, **changes: Any) -> ModelRecord | None:
        """Changes some fields of one row; None when the name is unknown."""
        with self._lock:
            self._refresh()
            current = self._records.get(name)
            if current is None:
                return None
            changed = replace(current, **changes, updated_at=self._clock())
            # Only the columns that change: a concurrent change of another column by another
            # process (a pin, a last use) is not overwritten with this process's stale copy.
            row = dict(zip(_COLUMNS, _to_row(changed), strict=True))
            columns = [c for c in _COLUMNS[1:] if c in changes or c == "updated_at"]
            assignments = ", ".join(f"{c} = ?" for c in columns)
            self._write(
                [
                    (
                        f"UPDATE models SET {assignments} WHERE name = ?",
                        (*(row[c] for c in columns), name),
                    )
                ]
            )
            return self._records.get(name, changed)

    def set_state(self, name: str, state: ModelState, reason: str = "") -> ModelRecord | None:
        return self.update(name, state=state, state_reason=reason)

    def set_pinned(self, name: str, pinned: bool) -> ModelRecord | None:
        return self.update(name, pinned=pinned)

    def remove(self, name: str) -> bool:
        with self._lock:
            self._refresh()
            if name not in self._records:
                return False
            self._write([("DELETE FROM models WHERE name = ?", (name,))])
            return True

    # -- download jobs -------------------------------------------------------------------------

    def save_download(
        self, job_id: str, state: str, owner: str, created_at: float, document: Mapping[str, Any]
    ) -> None:
        with self._lock:
            # An upsert, not a replace: a cancel requested by another process must survive.
            self._conn.execute(
                "INSERT INTO downloads (id, state, owner, created_at, document) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "state = excluded.state, owner = excluded.owner, document = excluded.document",
                (job_id, state, owner, created_at, json.dumps(dict(document), sort_keys=True)),
            )

    def download(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT owner, document FROM downloads WHERE id = ?", (job_id,)
            ).fetchone()
        return None if row is None else {**json.loads(row[1]), "owner": row[0]}

    def request_cancel(self, job_id: str) -> None:
        with self._lock:
            self._conn.execute("UPDATE downloads SET cancel_requested = 1 WHERE id = ?", (job_id,))

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            row = self._conn.execute(
                "SELECT cancel_requested FROM downloads WHERE id = ?", (job_id,)
            ).fetchone()
        return bool(row and row[0])

    def downloads(self, *, states: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Saved download jobs, newest first (each the document it was saved with, plus its
        `owner`)."""
        wanted = list(states)
        sql = "SELECT owner, document FROM downloads"
        if wanted:
            sql += f" WHERE state IN ({', '.join('?' for _ in wanted)})"
        sql += " ORDER BY created_at DESC, id DESC"
        with self._lock:
            rows = self._conn.execute(sql, wanted).fetchall()
        return [{**json.loads(document), "owner": owner} for owner, document in rows]

    def touch_due(self, name: str) -> bool:
        """Whether `touch(name)` would write now (callers on the event loop then run it in a
        thread: a write may wait for another process's lock)."""
        return self._clock() - self._last_used_written.get(name, float("-inf")) >= (
            LAST_USED_RESOLUTION_S
        )

    def touch(self, name: str) -> None:
        """Records that `name` served a request (at most once a minute per model: advisory)."""
        now = self._clock()
        if not self.touch_due(name):
            return
        self._last_used_written[name] = now
        try:
            with self._lock:
                self._conn.execute("UPDATE models SET last_used_at = ? WHERE name = ?", (now, name))
                self._reload()
        except sqlite3.Error:
            log.warning("model registry: could not record the last use of %s", name, exc_info=True)

    def sync(
        self, source: ModelSource, records: Sequence[ModelRecord]
    ) -> tuple[list[ModelRecord], list[ModelRecord]]:
        """Makes the rows of `source` equal to `records`: adds and updates them, removes rows of
        that source that are not among them. Returns (added, removed).

        A pinned row whose files vanished is kept in the ERROR state instead of removed: the
        operator asked to keep it, and should see that its files are gone.
        """
        added: list[ModelRecord] = []
        removed: list[ModelRecord] = []
        statements: list[tuple[str, tuple[Any, ...]]] = []
        wanted = {r.name: r for r in records}
        busy = (ModelState.DOWNLOADING, ModelState.DELETING)  # owned by a job in progress
        placeholders = ", ".join("?" for _ in _COLUMNS)
        now = self._clock()
        with self._lock:
            self._refresh()
            for name, record in wanted.items():
                current = self._records.get(name)
                if current is not None and (
                    current.state in busy
                    or _SOURCE_RANK[current.source] > _SOURCE_RANK[record.source]
                    or _same_files(current, record)
                ):
                    continue
                stored = replace(
                    record,
                    created_at=current.created_at if current else (record.created_at or now),
                    pinned=record.pinned or (current.pinned if current else False),
                    last_used_at=current.last_used_at if current else record.last_used_at,
                    updated_at=now,
                )
                statements.append(
                    (
                        f"INSERT OR REPLACE INTO models ({', '.join(_COLUMNS)}) "
                        f"VALUES ({placeholders})",
                        _to_row(stored),
                    )
                )
                if current is None:
                    added.append(stored)
            for current in self._records.values():
                if current.source is not source or current.name in wanted:
                    continue
                if current.state in busy:
                    continue
                if current.pinned:
                    if current.state is not ModelState.ERROR:
                        statements.append(
                            (
                                "UPDATE models SET state = ?, state_reason = ?, updated_at = ? "
                                "WHERE name = ?",
                                (
                                    ModelState.ERROR.value,
                                    f"the files of this pinned model are gone from {current.path}",
                                    now,
                                    current.name,
                                ),
                            )
                        )
                    continue
                statements.append(("DELETE FROM models WHERE name = ?", (current.name,)))
                removed.append(current)
            if statements:  # one transaction, one reload, however many rows changed
                self._write(statements)
        return added, removed


def _same_files(current: ModelRecord, new: ModelRecord) -> bool:
    """Whether `new` describes what `current` already records (no write needed)."""
    return (
        current.source is new.source
        and current.path == new.path
        and current.format == new.format
        and current.modality is new.modality
        and current.size_bytes == new.size_bytes
        and current.state is new.state
        and current.state_reason == new.state_reason
        and current.source_repo == new.source_repo
        and current.resolved_revision == new.resolved_revision
        and current.description == new.description
        and current.context_length == new.context_length
        and dict(current.settings) == dict(new.settings)
    )
