"""The filesystem artifact store: real files, a real SQLite index, real processes sharing a root."""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import pytest

from pluggably.api.pagination import encode_page_token
from pluggably.core.errors import InvalidArgument, NotFound, Unavailable
from pluggably.storage.artifacts import (
    ArtifactInfo,
    ArtifactNotFound,
    ArtifactStoreError,
    FilesystemArtifactStore,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
KIB = 1024


class Clock:
    """A settable time source: expiry and ordering are tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"


@pytest.fixture
async def store(root: Path, clock: Clock) -> AsyncIterator[FilesystemArtifactStore]:
    opened = await FilesystemArtifactStore.open(root, clock=clock)
    yield opened
    await opened.close()


def blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def put(
    store: FilesystemArtifactStore,
    data: bytes,
    *,
    model: str = "local/tiny-sd",
    kind: str = "image",
    ttl_s: float | None = None,
) -> ArtifactInfo:
    return await store.put(
        data, kind=kind, mime_type="image/png", model=model, request_id="req-1", ttl_s=ttl_s
    )


async def read_chunks(
    store: FilesystemArtifactStore, artifact_id: str, **kwargs: int
) -> list[bytes]:
    async with aclosing(store.read(artifact_id, **kwargs)) as chunks:
        return [chunk async for chunk in chunks]


def object_files(root: Path) -> list[Path]:
    """Every file in the object tree (not the index, not the temporary area)."""
    return sorted(
        p
        for p in root.rglob("*")
        if not p.is_dir() and p.relative_to(root).parts[0] != "tmp" and "index.db" not in p.name
    )


def exists(path: str) -> bool:
    return os.path.exists(path)


def on_another_file_system(directory: Path, other: Path) -> bool:
    return directory.is_dir() and os.stat(directory).st_dev != os.stat(other).st_dev


def temp_leftovers(root: Path) -> list[Path]:
    return sorted(p for p in (root / "tmp").rglob("*") if p.is_file() and p.suffix != ".lock")


# -- put, get, read ----------------------------------------------------------------------------


async def test_put_get_read_round_trip_in_chunks(
    store: FilesystemArtifactStore, root: Path, clock: Clock
) -> None:
    data = blob(1, 1024 * KIB + 123)
    info = await store.put(
        data, kind="mesh", mime_type="model/gltf-binary", model="local/shap-e", request_id="r-42"
    )

    assert info.id == hashlib.sha256(data).hexdigest()
    assert (info.kind, info.mime_type, info.size_bytes) == ("mesh", "model/gltf-binary", len(data))
    assert (info.model, info.request_id, info.created, info.expires) == (
        "local/shap-e",
        "r-42",
        clock.now,
        None,
    )
    assert await store.get(info.id) == info

    chunks = await read_chunks(store, info.id, chunk_size=64 * KIB)
    assert b"".join(chunks) == data
    assert len(chunks) == 17
    assert {len(c) for c in chunks[:-1]} == {64 * KIB} and len(chunks[-1]) == 123

    # Content-addressed layout, and nothing left in the temporary area.
    path = root / info.id[:2] / info.id[2:4] / info.id
    assert object_files(root) == [path]
    assert path.read_bytes() == data
    assert temp_leftovers(root) == []


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, None), (10, None), (0, 0), (65535, 2), (100, 200_000), (300_000, None), (300_000, 0)],
)
async def test_read_ranges(store: FilesystemArtifactStore, offset: int, length: int | None) -> None:
    data = blob(2, 300_000)
    info = await put(store, data)
    kwargs = {"offset": offset, "chunk_size": 64 * KIB}
    if length is not None:
        kwargs["length"] = length
    chunks = await read_chunks(store, info.id, **kwargs)
    end = len(data) if length is None else offset + length
    assert b"".join(chunks) == data[offset:end]
    assert all(0 < len(c) <= 64 * KIB for c in chunks)


@pytest.mark.parametrize(
    ("offset", "length", "field"),
    [(-1, None, "offset"), (1001, None, "offset"), (0, -1, "length"), (10, 991, "length")],
)
async def test_read_rejects_ranges_outside_the_file(
    store: FilesystemArtifactStore, offset: int, length: int | None, field: str
) -> None:
    info = await put(store, blob(3, 1000))
    with pytest.raises(InvalidArgument) as caught:
        await read_chunks(
            store, info.id, offset=offset, **({} if length is None else {"length": length})
        )
    assert [v.field for v in caught.value.violations] == [field]


async def test_empty_artifact(store: FilesystemArtifactStore) -> None:
    info = await put(store, b"")
    assert info.size_bytes == 0
    assert info.id == hashlib.sha256(b"").hexdigest()
    assert await read_chunks(store, info.id) == []


# -- dedup and expiry --------------------------------------------------------------------------


async def test_same_content_is_one_file_and_expiry_only_grows(
    store: FilesystemArtifactStore, root: Path, clock: Clock
) -> None:
    data = blob(4, 5000)
    first = await put(store, data, model="local/a", ttl_s=100)
    assert first.expires == clock.now + 100

    clock.now += 10
    shorter = await put(store, data, model="local/b", ttl_s=50)
    # The existing record comes back: its metadata, and an expiry that a shorter TTL cannot cut.
    assert shorter == first

    longer = await put(store, data, model="local/b", ttl_s=200)
    assert longer.expires == clock.now + 200
    assert (longer.id, longer.model, longer.created) == (first.id, "local/a", first.created)

    forever = await put(store, data, ttl_s=None)
    assert forever.expires is None
    assert (await put(store, data, ttl_s=5)).expires is None
    assert (await store.get(first.id)).expires is None

    assert len(object_files(root)) == 1
    assert await store.usage() == (5000, 1)


async def test_default_ttl_applies_unless_the_put_says_otherwise(root: Path, clock: Clock) -> None:
    async with FilesystemArtifactStore(root, default_ttl_s=60, clock=clock) as store:
        defaulted = await store.put(
            b"a", kind="other", mime_type="text/plain", model="m/x", request_id="r"
        )
        never = await put(store, b"b", ttl_s=None)
        assert defaulted.expires == clock.now + 60
        assert never.expires is None


async def test_expired_artifacts_are_hidden_then_removed(
    store: FilesystemArtifactStore, root: Path, clock: Clock
) -> None:
    short = await put(store, blob(5, 100), ttl_s=10)
    lasting = await put(store, blob(6, 200))
    clock.now += 9.5
    assert await store.get(short.id) == short

    clock.now += 0.5  # expiry is inclusive: at `expires` the artifact is gone
    with pytest.raises(ArtifactNotFound):
        await store.get(short.id)
    with pytest.raises(ArtifactNotFound):
        await read_chunks(store, short.id)
    page, _ = await store.list()
    assert [a.id for a in page] == [lasting.id]
    # Still on disk until expire() runs, so still counted.
    assert await store.usage() == (300, 2)
    assert len(object_files(root)) == 2

    assert await store.expire() == [short]
    assert await store.expire() == []
    assert await store.usage() == (200, 1)
    assert [p.name for p in object_files(root)] == [lasting.id]
    assert await store.get(lasting.id) == lasting


async def test_expire_at_a_given_time(store: FilesystemArtifactStore, clock: Clock) -> None:
    a = await put(store, b"a", ttl_s=10)
    b = await put(store, b"b", ttl_s=20)
    await put(store, b"c")
    assert await store.expire(now=clock.now + 15) == [a]
    assert await store.expire(now=clock.now + 1e9) == [b]
    assert (await store.usage())[1] == 1


async def test_content_put_again_after_expiry_is_stored_anew(
    store: FilesystemArtifactStore, clock: Clock
) -> None:
    data = blob(7, 64)
    old = await put(store, data, ttl_s=10)
    clock.now += 100
    again = await put(store, data, ttl_s=10, model="local/new")
    assert again.id == old.id
    assert (again.created, again.expires, again.model) == (clock.now, clock.now + 10, "local/new")
    assert await store.get(old.id) == again
    assert await store.expire() == []


async def test_evict_to_removes_the_oldest_first(
    store: FilesystemArtifactStore, root: Path, clock: Clock
) -> None:
    infos = []
    for seed, size in enumerate((100, 200, 300)):
        infos.append(await put(store, blob(seed, size)))
        clock.now += 1
    a, b, c = infos

    assert await store.evict_to(600) == []
    assert await store.evict_to(350) == [a, b]
    assert await store.usage() == (300, 1)
    assert [p.name for p in object_files(root)] == [c.id]
    assert await store.evict_to(0) == [c]
    assert await store.usage() == (0, 0)
    assert object_files(root) == []


# -- listing -----------------------------------------------------------------------------------


async def collect(store: FilesystemArtifactStore, **kwargs: object) -> list[list[str]]:
    """Pages of ids, following next_page_token to the end."""
    pages = []
    token = ""
    while True:
        page, token = await store.list(page_token=token, **kwargs)  # type: ignore[arg-type]
        pages.append([a.id for a in page])
        if not token:
            return pages


async def test_list_pages_newest_first_with_filters(
    store: FilesystemArtifactStore, clock: Clock
) -> None:
    stored = []
    for i in range(7):
        model = "local/a" if i % 2 == 0 else "local/b"
        kind = "image" if i < 4 else "mesh"
        stored.append(await put(store, blob(100 + i, 10), model=model, kind=kind))
        clock.now += 1
    newest_first = [a.id for a in reversed(stored)]

    assert await collect(store, page_size=3) == [
        newest_first[0:3],
        newest_first[3:6],
        newest_first[6:7],
    ]
    assert await collect(store) == [newest_first]
    assert await collect(store, page_size=7) == [newest_first]

    model_a = [a.id for a in reversed(stored) if a.model == "local/a"]
    assert await collect(store, page_size=2, model="local/a") == [model_a[0:2], model_a[2:4]]
    meshes_b = [a.id for a in reversed(stored) if a.model == "local/b" and a.kind == "mesh"]
    assert await collect(store, page_size=1, model="local/b", kind="mesh") == [[meshes_b[0]]]
    assert await collect(store, model="local/none") == [[]]


async def test_pages_survive_inserts_between_them(
    store: FilesystemArtifactStore, clock: Clock
) -> None:
    older = []
    for i in range(6):
        older.append((await put(store, blob(200 + i, 10))).id)
        clock.now += 1
    first, token = await store.list(page_size=4)
    for i in range(3):
        await put(store, blob(300 + i, 10))
        clock.now += 1
    second, token = await store.list(page_size=4, page_token=token)
    assert [a.id for a in first] + [a.id for a in second] == older[::-1]
    assert token == ""


async def test_pages_with_equal_timestamps_use_the_id_as_tie_break(
    store: FilesystemArtifactStore,
) -> None:
    ids = [(await put(store, blob(400 + i, 10))).id for i in range(5)]
    pages = await collect(store, page_size=2)
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for page in pages for i in page] == sorted(ids, reverse=True)


async def test_list_rejects_bad_tokens_sizes_and_kinds(store: FilesystemArtifactStore) -> None:
    for i in range(3):
        await put(store, blob(500 + i, 10), model="local/a")
    _, token = await store.list(page_size=1, model="local/a")
    assert token

    async def field_of(**kwargs: object) -> list[str]:
        with pytest.raises(InvalidArgument) as caught:
            await store.list(**kwargs)  # type: ignore[arg-type]
        return [v.field for v in caught.value.violations]

    assert await field_of(page_token=token, model="local/b") == ["page_token"]
    assert await field_of(page_token="not-a-token!") == ["page_token"]
    # The token format is right, the position inside is not one this store wrote.
    forged = encode_page_token("yesterday ../../etc", "artifacts\x00\x00")
    assert await field_of(page_token=forged) == ["page_token"]
    assert await field_of(page_size=1001) == ["page_size"]
    assert await field_of(page_size=-1) == ["page_size"]
    assert await field_of(kind="video") == ["kind"]


# -- ids, deletion, symlinks -------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_id",
    ["../x", "A" * 64, "ab", "", "0" * 63, "0" * 65, "0" * 64 + "\n", "../" + "0" * 61, "g" * 64],
)
async def test_invalid_ids_are_rejected_before_the_filesystem(
    store: FilesystemArtifactStore, root: Path, bad_id: str
) -> None:
    victim = root.parent / "x"
    victim.write_bytes(b"keep me")
    # Factories, not coroutines made up front: a failure must not leave the others unawaited.
    for call in (store.get, store.delete, lambda i: read_chunks(store, i)):
        with pytest.raises(InvalidArgument) as caught:
            await call(bad_id)
        assert [v.field for v in caught.value.violations] == ["id"]
    assert victim.read_bytes() == b"keep me"


async def test_delete_frees_bytes_and_missing_ids_are_not_found(
    store: FilesystemArtifactStore, root: Path
) -> None:
    info = await put(store, blob(8, 4321))
    other = await put(store, blob(9, 10))
    assert await store.usage() == (4331, 2)
    assert await store.delete(info.id) == 4321
    assert await store.usage() == (10, 1)
    assert [p.name for p in object_files(root)] == [other.id]

    for call in (store.delete, store.get, lambda i: read_chunks(store, i)):
        with pytest.raises(NotFound) as caught:
            await call(info.id)
        assert caught.value.reason == "ARTIFACT_NOT_FOUND"
        assert caught.value.metadata == {"artifact": info.id}


async def test_delete_never_follows_a_symlinked_directory_out_of_root(
    store: FilesystemArtifactStore, root: Path, tmp_path: Path
) -> None:
    info = await put(store, blob(10, 100))
    shard = root / info.id[:2]
    outside = tmp_path / "outside"
    shard.rename(outside)
    shard.symlink_to(outside, target_is_directory=True)
    target = outside / info.id[2:4] / info.id

    with pytest.raises(ArtifactNotFound):
        await read_chunks(store, info.id)
    assert await store.delete(info.id) == 0
    assert target.read_bytes() == blob(10, 100)
    with pytest.raises(ArtifactNotFound):
        await store.get(info.id)


# -- put_file ----------------------------------------------------------------------------------


async def test_put_file_moves_the_file_in(
    store: FilesystemArtifactStore, root: Path, tmp_path: Path
) -> None:
    data = blob(11, 70_000)
    source = tmp_path / "mesh.glb"
    source.write_bytes(data)
    inode = source.stat().st_ino

    info = await store.put_file(
        source, kind="mesh", mime_type="model/gltf-binary", model="local/shap-e", request_id="r"
    )
    assert info.id == hashlib.sha256(data).hexdigest() and info.size_bytes == len(data)
    assert not source.exists()
    stored = root / info.id[:2] / info.id[2:4] / info.id
    assert stored.stat().st_ino == inode  # renamed, not copied
    assert b"".join(await read_chunks(store, info.id)) == data

    # The same bytes again: the existing record, and the new file is taken (deleted) too.
    source.write_bytes(data)
    again = await store.put_file(
        source, kind="mesh", mime_type="model/gltf-binary", model="local/x", request_id="r2"
    )
    assert again == info
    assert not source.exists()
    assert await store.usage() == (len(data), 1)
    assert temp_leftovers(root) == []


async def test_put_file_refuses_a_directory(store: FilesystemArtifactStore, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match="regular file"):
        await store.put_file(
            folder, kind="other", mime_type="text/plain", model="m/x", request_id="r"
        )
    assert folder.is_dir()


async def test_put_file_copies_across_file_systems(
    store: FilesystemArtifactStore, root: Path
) -> None:
    shm = Path("/dev/shm")
    if not on_another_file_system(shm, root):
        pytest.skip("needs /dev/shm on another file system than the test's temporary directory")
    data = blob(12, 10_000)
    source = shm / f"pluggably-test-{os.getpid()}-{random.randrange(1 << 30)}"
    source.write_bytes(data)
    try:
        info = await store.put_file(
            source, kind="image", mime_type="image/png", model="m/x", request_id="r"
        )
    finally:
        exists = source.exists()
        source.unlink(missing_ok=True)
    assert not exists
    assert b"".join(await read_chunks(store, info.id)) == data


# -- crashes and sharing -----------------------------------------------------------------------


async def test_reopen_reconciles_what_a_crash_left(root: Path, clock: Clock) -> None:
    store = FilesystemArtifactStore(root, clock=clock)
    kept = await put(store, blob(13, 300))
    lost = await put(store, blob(14, 400))
    await store.close()

    # A record whose file is gone, a file without a record (in place and misplaced), a stray
    # temporary file, and the private temporary area of an instance that died mid-write.
    (root / lost.id[:2] / lost.id[2:4] / lost.id).unlink()
    orphan_id = hashlib.sha256(b"orphan").hexdigest()
    orphan = root / orphan_id[:2] / orphan_id[2:4] / orphan_id
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"orphan")
    misplaced = root / "00" / "00" / kept.id
    misplaced.parent.mkdir(parents=True)
    misplaced.write_bytes(blob(13, 300))
    (root / "tmp" / "stray.part").write_bytes(b"half")
    (root / "tmp" / "deadbeef.lock").touch()
    (root / "tmp" / "deadbeef").mkdir()
    (root / "tmp" / "deadbeef" / "half-written").write_bytes(b"half")

    async with await FilesystemArtifactStore.open(root, clock=clock) as reopened:
        assert await reopened.usage() == (300, 1)
        with pytest.raises(ArtifactNotFound):
            await reopened.get(lost.id)
        assert await reopened.get(kept.id) == kept
        assert [p.name for p in object_files(root)] == [kept.id]
        assert temp_leftovers(root) == []
        # Only the new instance's own area remains.
        assert len(list((root / "tmp").glob("*.lock"))) == 1
        assert not (root / "tmp" / "deadbeef").exists()


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "server")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_killed_process_leaves_nothing_a_reopen_does_not_clean(root: Path) -> None:
    result = run_python(
        f"""
        import asyncio, os
        from pluggably.storage.artifacts import FilesystemArtifactStore

        async def main():
            store = FilesystemArtifactStore({str(root)!r})
            info = await store.put(
                b"made before the crash", kind="other", mime_type="text/plain",
                model="m/x", request_id="r")
            half = store._temp.new_path()
            half.write_bytes(b"half a file")
            print(info.id, half, flush=True)
            os._exit(1)  # no close, no cleanup: as if killed

        asyncio.run(main())
        """
    )
    assert result.returncode == 1, result.stderr
    artifact_id, half = result.stdout.split()
    assert exists(half)

    async with await FilesystemArtifactStore.open(root) as store:
        assert not exists(half)
        assert temp_leftovers(root) == []
        assert b"".join(await read_chunks(store, artifact_id)) == b"made before the crash"


async def test_two_processes_share_a_root(store: FilesystemArtifactStore, root: Path) -> None:
    mine = await put(store, blob(15, 2000))
    own_area = sorted((root / "tmp").iterdir())
    result = run_python(
        f"""
        import asyncio
        from pluggably.storage.artifacts import FilesystemArtifactStore

        async def main():
            async with FilesystemArtifactStore({str(root)!r}) as other:
                seen = await other.get({mine.id!r})
                theirs = await other.put(
                    b"from the other process", kind="other", mime_type="text/plain",
                    model="m/other", request_id="r")
                print(seen.size_bytes, theirs.id)

        asyncio.run(main())
        """
    )
    assert result.returncode == 0, result.stderr
    seen_size, theirs = result.stdout.split()
    assert int(seen_size) == 2000
    # The other process's open did not take this live instance's temporary area away.
    assert own_area[0] in sorted((root / "tmp").iterdir())
    assert (await store.get(theirs)).model == "m/other"
    assert b"".join(await read_chunks(store, theirs)) == b"from the other process"
    assert (await put(store, blob(16, 10))).size_bytes == 10


async def test_two_instances_on_one_root_see_each_others_writes(
    store: FilesystemArtifactStore, root: Path, clock: Clock
) -> None:
    async with FilesystemArtifactStore(root, clock=clock) as other:
        info = await put(store, blob(17, 1000))
        assert await other.get(info.id) == info
        assert b"".join(await read_chunks(other, info.id)) == blob(17, 1000)

        assert await other.delete(info.id) == 1000
        with pytest.raises(ArtifactNotFound):
            await store.get(info.id)
        # Stored again through the first instance after the second deleted it: whole again.
        again = await put(store, blob(17, 1000))
        assert b"".join(await read_chunks(other, again.id)) == blob(17, 1000)


async def test_concurrent_puts_from_two_instances(
    store: FilesystemArtifactStore, root: Path
) -> None:
    import asyncio

    async with FilesystemArtifactStore(root) as other:
        contents = [blob(600 + i % 7, 5000 + i % 7) for i in range(28)]
        infos = await asyncio.gather(
            *(put(store if i % 2 else other, data) for i, data in enumerate(contents))
        )
        distinct = {hashlib.sha256(c).hexdigest(): len(c) for c in contents}
        assert {i.id for i in infos} == set(distinct)
        assert await store.usage() == (sum(distinct.values()), len(distinct))
        assert len(object_files(root)) == len(distinct)
        for info in infos[:7]:
            assert (
                hashlib.sha256(b"".join(await read_chunks(other, info.id))).hexdigest() == info.id
            )
    assert temp_leftovers(root) == []


# -- lifecycle and arguments -------------------------------------------------------------------


async def test_an_index_from_a_newer_version_is_refused(root: Path) -> None:
    FilesystemArtifactStore(root)._close_now()
    with sqlite3.connect(root / "index.db") as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(ArtifactStoreError, match="newer"):
        FilesystemArtifactStore(root)


async def test_a_closed_store_is_unavailable(root: Path) -> None:
    store = FilesystemArtifactStore(root)
    info = await put(store, b"x")
    await store.close()
    await store.close()
    with pytest.raises(Unavailable):
        await store.get(info.id)
    with pytest.raises(Unavailable):
        await put(store, b"y")
    assert list((root / "tmp").iterdir()) == []


async def test_server_side_mistakes_are_value_errors(store: FilesystemArtifactStore) -> None:
    with pytest.raises(ValueError, match="kind"):
        await store.put(b"x", kind="video", mime_type="video/mp4", model="m/x", request_id="r")
    with pytest.raises(ValueError, match="ttl_s"):
        await put(store, b"x", ttl_s=0)
    with pytest.raises(ValueError, match="default_ttl_s"):
        FilesystemArtifactStore(store.root, default_ttl_s=-1)
    with pytest.raises(ValueError, match="max_bytes"):
        await store.evict_to(-1)
    assert await store.usage() == (0, 0)
