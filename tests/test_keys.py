"""The API key store (real SQLite files) and the RPC scope table."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import pluggably.v1
from pluggably.core.context import KeyLimits
from pluggably.security import scopes
from pluggably.security.keys import (
    LAST_USED_RESOLUTION_S,
    MIGRATIONS,
    KeyStore,
    KeyStoreError,
    hash_key,
)


class Clock:
    """A settable time source, so expiry and last-use throttling are tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[KeyStore]:
    with KeyStore(tmp_path / "keys" / "keys.db", clock=clock) as opened:
        yield opened


def _secret_variants(key: str) -> list[str]:
    """The same key id with wrong secrets: one character changed, shortened, extended."""
    flipped = key[:-1] + ("A" if key[-1] != "A" else "B")
    return [flipped, key[:-1], key + "A", key[:16] + "x" * (len(key) - 16)]


# -- the key format and storage ----------------------------------------------------------------


def test_create_returns_a_key_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    with KeyStore(path) as store:
        key, record = store.create("alice", ["generate"])
    prefix, key_id, secret = key[:3], key[3:15], key[16:]
    assert prefix == "pk_" and key[15] == "_" and key_id == record.key_id
    assert record.prefix == f"pk_{key_id}" and key.startswith(record.prefix + "_")
    assert len(secret) >= 43  # 32 random bytes, url-safe base64
    assert set(key_id) <= set("abcdefghijklmnopqrstuvwxyz234567")

    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("keys.db"))
    assert hash_key(key).encode() in stored  # we are reading the right bytes...
    assert key.encode() not in stored and secret.encode() not in stored  # ...and no key in them


def test_store_file_is_owner_only_and_parents_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "keys.db"
    with KeyStore(path) as store:
        store.create("alice", ["generate"])
        assert (path.stat().st_mode & 0o777) == 0o600
        wal = path.with_name("keys.db-wal")
        assert wal.exists() and (wal.stat().st_mode & 0o777) == 0o600


def test_schema_version_is_recorded_and_a_newer_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    KeyStore(path).close()
    KeyStore(path).close()  # reopening does not migrate again
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(KeyStoreError, match="newer"):
        KeyStore(path)


def test_a_file_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(KeyStoreError, match=r"cannot open key store .*keys\.db"):
        KeyStore(path)


# -- create / list / get / revoke ----------------------------------------------------------------


def test_create_list_get_revoke(store: KeyStore) -> None:
    _, alice = store.create("alice", ["generate", "models:read"])
    bob_key, bob = store.create(
        "bob",
        ["admin"],
        models=["openai/gpt-4o-mini", "anthropic/*"],
        limits=KeyLimits(requests_per_minute=5, tokens_per_minute=1000, concurrent_streams=2),
    )
    assert [r.name for r in store.list()] == ["alice", "bob"]
    assert store.get(bob.key_id) == bob == store.get(bob.prefix)
    assert bob.scopes == ("admin",) and alice.scopes == ("generate", "models:read")
    assert bob.models == ("openai/gpt-4o-mini", "anthropic/*") and alice.models is None
    assert bob.limits == KeyLimits(5, 1000, 2) and alice.limits == KeyLimits()
    assert store.active_count() == 2

    assert store.revoke(bob_key)  # the full key works too; only its id is used
    assert store.get(bob.key_id).revoked_at is not None  # type: ignore[union-attr]
    assert [r.name for r in store.list()] == ["alice"]
    assert [r.name for r in store.list(include_revoked=True)] == ["alice", "bob"]
    assert store.active_count() == 1
    assert store.revoke(bob.key_id)  # again: still revoked, the first time kept
    assert not store.revoke("pk_aaaaaaaaaaaa") and not store.revoke("nonsense")
    assert store.get("aaaaaaaaaaaa") is None


@pytest.mark.parametrize(
    ("scope_list", "message"),
    [
        (["generate", "bogus", "nope"], "bogus, nope"),
        (["models:delete"], "models:delete"),
        ([], "at least one scope"),
    ],
)
def test_bad_scopes_are_refused_by_name(
    store: KeyStore, scope_list: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        store.create("x", scope_list)
    assert store.list(include_revoked=True) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"models": ["gpt-4o"]},
        {"models": ["openai/gpt*"]},
        {"models": ["*"]},
        {"limits": KeyLimits(requests_per_minute=0)},
        {"expires_at": datetime(2030, 1, 1)},  # naive: which zone?
    ],
)
def test_bad_key_settings_are_refused(store: KeyStore, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        store.create("x", ["generate"], **kwargs)  # type: ignore[arg-type]


def test_bad_names_are_refused(store: KeyStore) -> None:
    for name in ("", "   ", "a\nb", "x" * 101):
        with pytest.raises(ValueError, match="name"):
            store.create(name, ["generate"])


# -- authenticate -------------------------------------------------------------------------------


def test_authenticate_returns_the_principal(store: KeyStore) -> None:
    key, record = store.create(
        "alice",
        ["generate"],
        models=["local/tiny", "openai/*"],
        limits=KeyLimits(requests_per_minute=7),
    )
    principal = store.authenticate(key)
    assert principal is not None
    assert principal.key_id == record.key_id and principal.name == "alice"
    assert principal.scopes == frozenset({"generate"})
    assert principal.models == frozenset({"local/tiny", "openai/*"})
    assert principal.limits == KeyLimits(requests_per_minute=7)
    assert principal.may_use("local/tiny") and principal.may_use("openai/gpt-4o")
    assert not principal.may_use("local/other") and not principal.may_use("anthropic/claude")


def test_admin_expands_to_every_scope(store: KeyStore) -> None:
    key, _ = store.create("root", ["admin"])
    principal = store.authenticate(key)
    assert principal is not None and principal.scopes == frozenset(scopes.SCOPES)
    assert principal.models is None and principal.may_use("anything/at-all")


def test_unknown_malformed_and_wrong_secret_are_refused(store: KeyStore) -> None:
    key, _ = store.create("alice", ["generate"])
    other_key, _ = store.create("bob", ["generate"])
    unknown = "pk_aaaaaaaaaaaa_" + key[16:]  # a well-formed key the store never issued
    malformed = [
        "",
        "pk_",
        key[:15],  # the visible prefix alone
        key[:16],  # prefix and separator, no secret
        f"Bearer {key}",
        key.replace("pk_", "PK_", 1),
        key[:15] + "-" + key[16:],  # wrong separator
        key.upper(),
        key + "é",  # not ASCII
        key + "\x00",
        key + "A" * 300,  # oversized
        "x" * 100_000,
    ]
    for presented in [unknown, *malformed, *_secret_variants(key)]:
        assert store.authenticate(presented) is None, presented
    # Another key's secret under this key's id: the id picks the hash, the secret must match it.
    assert store.authenticate(key[:16] + other_key[16:]) is None
    assert store.authenticate(key) is not None and store.authenticate(other_key) is not None


def test_revoked_key_is_refused_at_once(store: KeyStore) -> None:
    key, record = store.create("alice", ["generate"])
    assert store.authenticate(key) is not None
    assert store.revoke(record.key_id)
    assert store.authenticate(key) is None
    assert store.verify(key) is None


def test_expired_key_is_refused(store: KeyStore, clock: Clock) -> None:
    start = datetime.fromtimestamp(clock.now, UTC)
    key, record = store.create("temp", ["generate"], expires_at=start + timedelta(seconds=30))
    past_key, _ = store.create("old", ["generate"], expires_at=start - timedelta(seconds=1))
    assert record.expires_at == start + timedelta(seconds=30)
    assert store.authenticate(key) is not None and store.authenticate(past_key) is None
    assert store.active_count() == 1
    clock.now += 30
    assert store.authenticate(key) is None and store.verify(key) is None
    assert store.active_count() == 0
    assert record.status(start) == "active"
    assert store.get(record.key_id).status(start + timedelta(seconds=31)) == "expired"  # type: ignore[union-attr]


def test_last_used_is_written_at_most_once_a_minute(store: KeyStore, clock: Clock) -> None:
    key, record = store.create("alice", ["generate"])
    assert record.last_used_at is None
    assert store.verify(key) is not None  # verifying is not using
    assert store.get(record.key_id).last_used_at is None  # type: ignore[union-attr]

    first = datetime.fromtimestamp(clock.now, UTC)
    store.authenticate(key)
    assert store.get(record.key_id).last_used_at == first  # type: ignore[union-attr]
    clock.now += LAST_USED_RESOLUTION_S - 1
    store.authenticate(key)
    assert store.get(record.key_id).last_used_at == first  # type: ignore[union-attr]
    clock.now += 1
    store.authenticate(key)
    assert store.get(record.key_id).last_used_at == datetime.fromtimestamp(clock.now, UTC)  # type: ignore[union-attr]


@pytest.mark.timeout(4)  # a call that waited for the lock would take the 5 s busy timeout
def test_a_busy_store_does_not_stall_or_fail_a_call(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "keys.db"
    with KeyStore(path, clock=clock) as store:
        key, record = store.create("alice", ["generate"])
        writer = sqlite3.connect(path, isolation_level=None, timeout=0)
        try:
            writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            # The last-use write would have to wait for the lock: it is skipped, not awaited.
            assert store.authenticate(key) is not None
            writer.execute("ROLLBACK")
        finally:
            writer.close()
        assert store.get(record.key_id).last_used_at is None  # type: ignore[union-attr]
        clock.now += LAST_USED_RESOLUTION_S
        assert store.authenticate(key) is not None
        assert store.get(record.key_id).last_used_at is not None  # type: ignore[union-attr]


def test_revocation_by_another_instance_takes_effect_on_the_next_call(
    tmp_path: Path, clock: Clock
) -> None:
    path = tmp_path / "keys.db"
    with KeyStore(path, clock=clock) as server, KeyStore(path, clock=clock) as admin:
        key, record = server.create("alice", ["generate"])
        assert server.authenticate(key) is not None
        # A key created elsewhere is known on the next call as well.
        late_key, _ = admin.create("late", ["models:read"])
        assert server.authenticate(late_key) is not None
        assert admin.revoke(record.key_id)
        assert server.authenticate(key) is None
        assert server.authenticate(late_key) is not None


def test_revocation_by_another_process_takes_effect_on_the_next_call(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    with KeyStore(path) as server:
        key, record = server.create("alice", ["generate"])
        keep_key, _ = server.create("bob", ["generate"])
        assert server.authenticate(key) is not None
        done = subprocess.run(
            [sys.executable, "-m", "pluggably.cli", "keys", "revoke", record.prefix],
            env={**os.environ, "PLUGGABLY_AUTH__STORE": str(path)},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert record.prefix in done.stdout
        assert server.authenticate(key) is None
        assert server.authenticate(keep_key) is not None


# -- scopes ----------------------------------------------------------------------------------


def _contract_methods() -> set[str]:
    methods: set[str] = set()
    for module_info in pkgutil.iter_modules(pluggably.v1.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"pluggably.v1.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            methods.update(f"/{service.full_name}/{m.name}" for m in service.methods)
    return methods


def test_every_rpc_of_the_contract_has_a_scope() -> None:
    methods = _contract_methods()
    assert len(methods) >= 17  # the walk found the services
    assert sorted(methods - scopes.METHOD_SCOPES.keys()) == [], "RPCs without a scope"
    assert sorted(scopes.METHOD_SCOPES.keys() - methods) == [], "scopes of RPCs that do not exist"
    for method in methods:
        scope = scopes.required_scope(method)
        assert scope in scopes.SCOPES and scope != scopes.ADMIN


def test_scope_table_reads_and_changes() -> None:
    required = scopes.required_scope
    assert required("/pluggably.v1.GenerateService/Generate") == "generate"
    assert required("/pluggably.v1.StreamService/StreamGenerate") == "generate"
    assert required("/pluggably.v1.ModelService/ListModels") == "models:read"
    assert required("/pluggably.v1.ModelService/WatchDownload") == "models:read"
    assert required("/pluggably.v1.ModelService/DeleteModel") == "models:write"
    assert required("/pluggably.v1.StorageService/ReadArtifact") == "storage:read"
    assert required("/pluggably.v1.StorageService/PruneStorage") == "storage:admin"
    assert required("/pluggably.v1.StorageService/DeleteArtifact") == "storage:admin"
    assert required("/pluggably.v1.ModelService/Nope") is None
    assert required("/grpc.health.v1.Health/Check") is None
    assert scopes.needs_key_only("/grpc.health.v1.Health/Check")
    assert scopes.needs_key_only("/grpc.health.v1.Health/Watch")
    assert scopes.needs_key_only("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert scopes.needs_key_only("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    assert not scopes.needs_key_only("/pluggably.v1.GenerateService/Generate")
    assert not scopes.needs_key_only("/grpc.health.v1.HealthX/Check")
    assert set(scopes.SCOPE_MEANINGS) == set(scopes.SCOPES)
    assert scopes.expand(["admin"]) == frozenset(scopes.SCOPES)
    assert scopes.expand(["generate", "junk"]) == frozenset({"generate"})
    assert scopes.unknown_scopes(["generate", "x", "y", "x"]) == ["x", "y"]


def test_the_hot_path_reads_the_wal_index_instead_of_querying(tmp_path: Path) -> None:
    """Unchanged store: no statement runs on authenticate; any commit elsewhere is seen."""
    store = KeyStore(tmp_path / "keys.db")
    key, record = store.create("k", ["generate"])
    try:
        assert store._shm is not None, "the WAL index is mapped"
        # The first call records the key's last use (a commit of this connection), which the
        # second sees as a change.
        assert store.authenticate(key) is not None
        assert store.authenticate(key) is not None
        statements: list[str] = []
        store._conn.set_trace_callback(statements.append)
        for _ in range(3):
            assert store.authenticate(key) is not None
        assert statements == [], "an unchanged store costs no statement"
        other = KeyStore(tmp_path / "keys.db")
        try:
            other.create("unrelated", ["generate"])  # any commit changes the header
            assert store.authenticate(key) is not None
            assert statements[0] == "PRAGMA data_version", statements  # then a reload
            other.revoke(record.key_id)
        finally:
            other.close()
        assert store.authenticate(key) is None
    finally:
        store.close()
