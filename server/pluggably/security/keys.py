"""API keys: a small SQLite store of key hashes, and the per-call check against it.

A key reads `pk_<key_id>_<secret>`. The key id (12 lowercase base32 characters) is public: it
names the key in lists, logs and metrics (`pk_<key_id>` is its "visible prefix"). The secret is 32
random bytes. Only the SHA-256 of the whole key is stored.

The server calls `KeyStore.authenticate` on every RPC. It answers from an in-memory map and asks
SQLite one cheap question first, `PRAGMA data_version`, which changes when another connection
(the `pluggably keys` CLI, another server process sharing the file) has committed a change: then
the map is reloaded. So a revocation takes effect on the very next call in every process, with
no restart and no polling.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import hmac
import json
import logging
import mmap
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pluggably.core import sqlite as sqlite_store
from pluggably.core.context import KeyLimits, Principal
from pluggably.security import scopes as scope_table

log = logging.getLogger("pluggably.security.keys")

KEY_PREFIX = "pk_"
KEY_ID_LENGTH = 12
SECRET_BYTES = 32
# Far above a real key (3 + 12 + 1 + 43 characters): anything longer is refused before hashing.
MAX_PRESENTED_LENGTH = 256
# last_used_at is advisory: one write per key per this many seconds keeps the hot path read-only.
LAST_USED_RESOLUTION_S = 60.0


_KEY_ID = re.compile(r"^[a-z2-7]{12}$")
_MODEL_PATTERN = re.compile(r"^[^\s*/]+/(\*|[^\s*]+)$")
_MAX_NAME = 100

# SHA-256 of a key on every call: CPython's own implementation (`_sha2`, `_sha256` before 3.12)
# runs a fraction of the code of OpenSSL's EVP path for a 60-byte input, which in a serving
# process (cold caches) made the hash a quarter of the key check. Same digest either way.
try:
    from _sha2 import sha256 as _sha256  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # Python 3.11
    try:
        from _sha256 import sha256 as _sha256  # type: ignore[import-not-found,no-redef,unused-ignore]
    except ImportError:  # a build without it
        _sha256 = hashlib.sha256

# Ordered schema migrations: migration i (0-based) brings the store from version i to i + 1,
# recorded in `PRAGMA user_version`. Append; never edit a released entry. Types and statements
# stay portable so that the same table can live in PostgreSQL later.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE api_keys (
            key_id TEXT PRIMARY KEY,
            key_hash TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            scopes TEXT NOT NULL,
            models TEXT,
            requests_per_minute INTEGER,
            tokens_per_minute INTEGER,
            concurrent_streams INTEGER,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION,
            revoked_at DOUBLE PRECISION,
            last_used_at DOUBLE PRECISION
        )
        """,
    ),
)

_COLUMNS = (
    "key_id, key_hash, name, scopes, models, requests_per_minute, tokens_per_minute, "
    "concurrent_streams, created_at, expires_at, revoked_at, last_used_at"
)


class KeyStoreError(Exception):
    """The store cannot be used (unreadable, or written by a newer version of pluggably)."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What the store knows about a key: never its material, never its hash."""

    key_id: str
    name: str
    scopes: tuple[str, ...]
    # Model ids or `provider/*` patterns; None: every model.
    models: tuple[str, ...] | None
    limits: KeyLimits
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def prefix(self) -> str:
        """The visible part of the key, `pk_<key_id>`: safe to show and log."""
        return KEY_PREFIX + self.key_id

    def status(self, now: datetime | None = None) -> str:
        """`active`, `expired` or `revoked`."""
        if self.revoked_at is not None:
            return "revoked"
        now = now or datetime.now(UTC)
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    principal: Principal
    expires_at: float | None


def hash_key(key: str) -> str:
    """The stored form of a key.

    A plain SHA-256 is the right hash here, not a password hash (bcrypt, scrypt, argon2): a key
    carries 256 random bits, so there is nothing for stretching to protect against guessing, and
    a slow hash would cost milliseconds on every RPC.
    """
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def key_id_of(text: str) -> str | None:
    """The key id in a full key, a visible prefix (`pk_<id>`) or a bare id; None if none."""
    if text.startswith(KEY_PREFIX):
        text = text[len(KEY_PREFIX) : len(KEY_PREFIX) + KEY_ID_LENGTH + 1]
        if len(text) == KEY_ID_LENGTH + 1:
            if text[-1] != "_":
                return None
            text = text[:-1]
    return text if _KEY_ID.match(text) else None


def _new_key() -> tuple[str, str]:
    key_id = base64.b32encode(secrets.token_bytes(8)).decode("ascii").lower()[:KEY_ID_LENGTH]
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"


def _epoch(value: datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("expires_at must be timezone-aware (e.g. datetime.now(UTC))")
    return value.timestamp()


def _when(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _check_models(models: Iterable[str] | None) -> list[str] | None:
    if models is None:
        return None
    checked = list(dict.fromkeys(models))
    bad = [m for m in checked if not _MODEL_PATTERN.match(m)]
    if bad:
        raise ValueError(
            "models must be model ids (provider/model) or provider/* patterns; not: "
            + ", ".join(repr(m) for m in bad)
        )
    return checked


def _check_limits(limits: KeyLimits) -> None:
    for field in ("requests_per_minute", "tokens_per_minute", "concurrent_streams"):
        value = getattr(limits, field)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{field} must be a positive integer or None, not {value!r}")


class KeyStore:
    """API keys in one SQLite file, shared safely by several processes (WAL).

    Use it from one thread at a time: the server uses it from its event loop thread only.
    """

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Created here, owner-only, before SQLite opens it: SQLite gives the -wal and -shm
            # files the same mode as the database.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise KeyStoreError(f"cannot open key store {self.path}: {exc.strerror}") from None
        # Autocommit: the hot path never holds a read transaction open, which would pin a
        # snapshot and hide revocations. FULL: a revocation must survive a power cut as soon
        # as the CLI says it is done.
        try:
            self._conn = sqlite_store.connect(self.path, what="key store", synchronous="FULL")
        except sqlite_store.SchemaError as exc:
            raise KeyStoreError(str(exc)) from None
        try:
            sqlite_store.migrate(self._conn, MIGRATIONS, what="key store", path=self.path)
        except sqlite_store.SchemaError as exc:
            self._conn.close()
            raise KeyStoreError(str(exc)) from None
        except BaseException:
            self._conn.close()
            raise
        self._closed = False
        self._entries: dict[str, _Entry] = {}
        self._last_used: dict[str, float] = {}
        self._data_version = -1
        self._shm, self._shm_header = self._map_wal_index()
        self._reload()

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._shm is not None:
                self._shm.close()
            self._conn.close()

    # WAL-index header: the first of its two 48-byte copies at the start of the `-shm` file
    # (https://www.sqlite.org/walformat.html). Every commit by any connection rewrites it
    # (change counter, last frame, checksums; a WAL reset changes the salts), because that is
    # how SQLite's own readers learn that the database changed. Comparing it is a memory read;
    # `PRAGMA data_version` is a statement whose execution releases the GIL, which in a busy
    # server costs far more than the statement itself. The file stays while this connection is
    # open (SQLite removes it with the last connection, and leaving WAL mode needs every other
    # connection closed), so an unchanged header proves nothing was committed since.
    _WAL_INDEX_HEADER = 48

    def _map_wal_index(self) -> tuple[mmap.mmap | None, bytes]:
        try:
            with open(f"{self.path}-shm", "rb") as shm:
                mapped = mmap.mmap(shm.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # no WAL index (not WAL mode, another platform)
            return None, b""
        if len(mapped) < self._WAL_INDEX_HEADER:
            mapped.close()
            return None, b""
        return mapped, b""

    def _maybe_changed(self) -> bool:
        """Whether another connection may have committed since the last check (never a false
        "no")."""
        shm = self._shm
        if shm is None:
            return True
        header = shm[: self._WAL_INDEX_HEADER]
        if header == self._shm_header:
            return False
        self._shm_header = header
        return True

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- administration ----------------------------------------------------------------------

    def create(
        self,
        name: str,
        scopes: Iterable[str],
        *,
        models: Iterable[str] | None = None,
        limits: KeyLimits | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[str, KeyRecord]:
        """A new key: returns the full key (shown once, kept nowhere) and its record."""
        name = name.strip()
        if not name or len(name) > _MAX_NAME or not name.isprintable():
            raise ValueError(f"a key name is 1 to {_MAX_NAME} printable characters")
        scope_list = list(dict.fromkeys(scopes))
        unknown = scope_table.unknown_scopes(scope_list)
        if unknown:
            raise ValueError(
                f"unknown scope(s): {', '.join(unknown)}; known: {', '.join(scope_table.SCOPES)}"
            )
        if not scope_list:
            raise ValueError("a key needs at least one scope")
        model_list = _check_models(models)
        limits = limits or KeyLimits()
        _check_limits(limits)
        expires = _epoch(expires_at)
        now = self._clock()
        for _ in range(5):
            key_id, key = _new_key()
            try:
                self._conn.execute(
                    f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        key_id,
                        hash_key(key),
                        name,
                        json.dumps(scope_list),
                        None if model_list is None else json.dumps(model_list),
                        limits.requests_per_minute,
                        limits.tokens_per_minute,
                        limits.concurrent_streams,
                        now,
                        expires,
                        None,
                        None,
                    ),
                )
            except sqlite3.IntegrityError:
                continue  # a 60-bit id collided: draw another
            break
        else:  # pragma: no cover - five collisions of 60 random bits
            raise KeyStoreError("could not draw an unused key id")
        # This connection's own writes do not change its data_version: reload explicitly.
        self._reload()
        record = self.get(key_id)
        assert record is not None
        return key, record

    def list(self, include_revoked: bool = False) -> builtins.list[KeyRecord]:
        """Every key, oldest first; revoked ones only when asked (expired ones always)."""
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM api_keys{where} ORDER BY created_at, rowid"
        ).fetchall()
        return [self._record(row) for row in rows]

    def get(self, key_id: str) -> KeyRecord | None:
        """The record of a key, by its id (or its visible prefix or the full key)."""
        found = key_id_of(key_id)
        if found is None:
            return None
        row = self._conn.execute(
            f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (found,)
        ).fetchone()
        return None if row is None else self._record(row)

    def revoke(self, key_id: str) -> bool:
        """Revokes a key named by its id, its visible prefix or the full key (only its id is
        used). True if the key exists and is now revoked (also when it already was)."""
        found = key_id_of(key_id)
        if found is None:
            return False
        self._conn.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
            (self._clock(), found),
        )
        self._reload()
        return (
            self._conn.execute("SELECT 1 FROM api_keys WHERE key_id = ?", (found,)).fetchone()
            is not None
        )

    def active_count(self) -> int:
        """Keys that authenticate now: neither revoked nor expired."""
        row = self._conn.execute(
            "SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL "
            "AND (expires_at IS NULL OR expires_at > ?)",
            (self._clock(),),
        ).fetchone()
        return int(row[0])

    def verify(self, presented: str) -> KeyRecord | None:
        """The record of `presented` if it authenticates now, without marking it used (for
        tools such as `pluggably keys ensure-dev`)."""
        entry = self._lookup(presented, self._clock())
        if entry is None:
            return None
        return self.get(entry.principal.key_id)

    # -- the hot path --------------------------------------------------------------------------

    def authenticate(self, presented: str) -> Principal | None:
        """Who `presented` (the bearer token of a call) is; None if it is not a valid key.

        Called on every RPC: a length and format check, one `PRAGMA data_version`, a dict
        lookup and a SHA-256; a write at most once a minute per key (last_used_at).
        """
        now = self._clock()
        entry = self._lookup(presented, now)
        if entry is None:
            return None
        key_id = entry.principal.key_id
        if now - self._last_used.get(key_id, float("-inf")) >= LAST_USED_RESOLUTION_S:
            self._touch(key_id, now)
        return entry.principal

    def _lookup(self, presented: str, now: float) -> _Entry | None:
        if (
            len(presented) > MAX_PRESENTED_LENGTH
            or not presented.startswith(KEY_PREFIX)
            or not presented.isascii()
        ):
            return None
        # `pk_<id>_<secret>`; an id that is not one simply finds no entry below.
        id_end = len(KEY_PREFIX) + KEY_ID_LENGTH
        if len(presented) <= id_end + 1 or presented[id_end] != "_":
            return None
        key_id = presented[len(KEY_PREFIX) : id_end]
        if self._maybe_changed():
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version:
                self._reload()
        entry = self._entries.get(key_id)
        if entry is None:
            return None
        # Constant time, so the response time says nothing about how much of a secret matched.
        if not hmac.compare_digest(_sha256(presented.encode("ascii")).digest(), entry.digest):
            return None
        if entry.expires_at is not None and now >= entry.expires_at:
            return None
        return entry

    def _touch(self, key_id: str, now: float) -> None:
        self._last_used[key_id] = now
        # Advisory and never worth stalling a call for: no waiting for another writer's lock,
        # no fsync (losing it to a power cut is harmless), and a failure (busy, read-only file)
        # is only logged.
        try:
            self._conn.execute("PRAGMA busy_timeout = 0")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            try:
                self._conn.execute(
                    "UPDATE api_keys SET last_used_at = ? WHERE key_id = ?", (now, key_id)
                )
            finally:
                self._conn.execute("PRAGMA synchronous = FULL")
                self._conn.execute(f"PRAGMA busy_timeout = {sqlite_store.BUSY_TIMEOUT_MS}")
        except sqlite3.Error as exc:
            log.debug("could not record the last use of key %s: %s", key_id, exc)

    def _reload(self) -> None:
        # Read the version first: a change committed between the two statements then only
        # causes one more (harmless) reload on the next call.
        self._data_version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM api_keys WHERE revoked_at IS NULL"
        ).fetchall()
        entries: dict[str, _Entry] = {}
        last_used: dict[str, float] = {}
        for row in rows:
            record = self._record(row)
            entries[record.key_id] = _Entry(
                digest=bytes.fromhex(row[1]),
                principal=Principal(
                    key_id=record.key_id,
                    name=record.name,
                    scopes=scope_table.expand(record.scopes),
                    models=None if record.models is None else frozenset(record.models),
                    limits=record.limits,
                ),
                expires_at=row[9],
            )
            if row[11] is not None:
                last_used[record.key_id] = row[11]
        # A use recorded by this process but not yet by another that overwrote it counts too.
        for key_id, when in self._last_used.items():
            if key_id in entries and when > last_used.get(key_id, float("-inf")):
                last_used[key_id] = when
        self._entries = entries
        self._last_used = last_used

    @staticmethod
    def _record(row: tuple[Any, ...]) -> KeyRecord:
        return KeyRecord(
            key_id=row[0],
            name=row[2],
            scopes=tuple(json.loads(row[3])),
            models=None if row[4] is None else tuple(json.loads(row[4])),
            limits=KeyLimits(
                requests_per_minute=row[5], tokens_per_minute=row[6], concurrent_streams=row[7]
            ),
            created_at=datetime.fromtimestamp(row[8], UTC),
            expires_at=_when(row[9]),
            revoked_at=_when(row[10]),
            last_used_at=_when(row[11]),
        )
