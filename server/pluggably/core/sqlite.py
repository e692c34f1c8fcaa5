"""What every SQLite store of the gateway shares: how a file is opened and how its schema moves.

The key store, the model registry and the artifact index are each one SQLite file that several
server processes may open at once. They all open it the same way (WAL, a busy timeout, autocommit
so a reader never pins a snapshot) and migrate it the same way: an ordered list of migrations,
`PRAGMA user_version` recording how many ran, applied under `BEGIN IMMEDIATE` so that of two
processes opening a new file at once the second waits and then migrates nothing. A file from a
newer version is refused rather than guessed at.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

BUSY_TIMEOUT_MS = 5000

Migrations = Sequence[Sequence[str]]


class SchemaError(Exception):
    """The file cannot be opened or migrated; the message names it and says why."""


def connect(
    path: Path,
    *,
    what: str,
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    busy_timeout_ms: int = BUSY_TIMEOUT_MS,
) -> sqlite3.Connection:
    """An autocommit connection to `path` in WAL mode. `what` names the store in errors.

    check_same_thread=False: stores open in one thread and are used from the event loop's or
    a worker's; each store makes sure one thread at a time uses a connection.
    """
    try:
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000
        )
    except sqlite3.Error as exc:
        raise SchemaError(f"cannot open {what} {path}: {exc}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        # Switching a new file to WAL ignores the busy timeout: several processes opening the
        # same new file at once may see "locked" here; wait like the timeout would.
        deadline = time.monotonic() + busy_timeout_ms / 1000
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    except sqlite3.Error as exc:
        conn.close()
        raise SchemaError(f"cannot open {what} {path}: {exc}") from None
    return conn


def migrate(conn: sqlite3.Connection, migrations: Migrations, *, what: str, path: Path) -> None:
    """Applies the migrations `conn`'s file has not had yet (see the module docstring)."""
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(migrations):
            raise SchemaError(
                f"{what} {path} has schema version {version}, newer than this pluggably "
                f"understands ({len(migrations)}): upgrade pluggably"
            )
        if version == len(migrations):
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for index in range(version, len(migrations)):
                for statement in migrations[index]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {len(migrations)}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise SchemaError(f"cannot migrate {what} {path}: {exc}") from None
