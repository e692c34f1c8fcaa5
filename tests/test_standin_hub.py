"""The Hub stand-in serves the real huggingface_hub (2.4) client: downloads land in the standard
cache layout with the exact bytes, revisions/patterns/listings work, errors become the library's
own exceptions, and the faults behave the way the library is known to react to them.

Every call passes `endpoint=hub.endpoint` and an explicit `token` (False: anonymous), because
huggingface_hub reads HF_ENDPOINT when it is imported and finds tokens in the environment or a
token file on its own."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx2
import pytest
from huggingface_hub import (
    HfApi,
    close_session,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

from pluggably.devtools.standins.hub import HubStandIn

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
CHUNK = 10 * MIB  # huggingface_hub's DOWNLOAD_CHUNK_SIZE: what it keeps of a broken body
TOKEN = "hf_granted_0123456789abcdef"
OTHER_TOKEN = "hf_valid_but_not_granted_0123"


def _bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


FILES = {
    "config.json": b'{"model_type": "llama", "hidden_size": 64}',
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
    "weights/model.safetensors": _bytes(3 * MIB + 17, seed=1),
    "sub/dir/notes.txt": b"subfolder file\n",
}


@pytest.fixture(autouse=True)
def _hub_client(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub copies these from the environment when it is first imported, which may
    # have happened in another test module with other values.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield
    # Its shared HTTP client keeps connections to this test's (now stopped) stand-in.
    close_session()


def _read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def _files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _cache_files(root: Path, suffix: str) -> list[Path]:
    return [p for p in root.rglob(f"*{suffix}") if p.is_file()]


async def test_snapshot_download_gives_exact_bytes_in_the_standard_cache_layout(
    tmp_path: Path,
) -> None:
    async with HubStandIn() as hub:
        sha = hub.add_repo("org/tiny", FILES)
        path = await asyncio.to_thread(
            snapshot_download, "org/tiny", endpoint=hub.endpoint, cache_dir=tmp_path, token=False
        )
    storage = tmp_path / "models--org--tiny"
    snapshot = storage / "snapshots" / sha
    assert Path(path) == snapshot
    assert (storage / "refs" / "main").read_text() == sha
    for name, content in FILES.items():
        file = snapshot / name
        assert file.read_bytes() == content
        # Snapshot entries link to blobs named by ETag: sha256 for LFS files, git sha1 otherwise.
        assert file.is_symlink()
        blob = file.resolve()
        assert blob.parent == (storage / "blobs").resolve()
        lfs = name.endswith(".safetensors")
        expected = hashlib.sha256(content).hexdigest() if lfs else _git_blob_sha1(content)
        assert blob.name == expected
    assert sorted(p.name for p in (storage / "blobs").iterdir()) == sorted(
        p.resolve().name for p in snapshot.rglob("*") if p.is_file()
    )
    assert _cache_files(tmp_path, ".incomplete") == []
    gets = [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]
    assert sorted(r.path.split(f"/{sha}/", 1)[1] for r in gets) == sorted(FILES)
    assert hub.bytes_served == sum(len(c) for c in FILES.values())


async def test_revisions_branch_tag_and_commit_sha(tmp_path: Path) -> None:
    async with HubStandIn() as hub:
        v1 = hub.add_repo("org/rev", {"a.txt": b"one"}, tags=("v1.0",))
        v2 = hub.add_repo("org/rev", {"a.txt": b"two", "b.txt": b"added"})
        assert v1 != v2
        # Shas come from content and history: the same commits get the same shas anywhere.
        again = HubStandIn()
        assert again.add_repo("org/rev", {"a.txt": b"one"}) == v1
        assert again.add_repo("org/rev", {"a.txt": b"two", "b.txt": b"added"}) == v2
        with pytest.raises(ValueError):
            hub.add_repo("org/rev", {"a.txt": b"x"}, revision=v1)

        def download(revision: str) -> Path:
            return Path(
                snapshot_download(
                    "org/rev",
                    revision=revision,
                    endpoint=hub.endpoint,
                    cache_dir=tmp_path,
                    token=False,
                )
            )

        main = await asyncio.to_thread(download, "main")
        tagged = await asyncio.to_thread(download, "v1.0")
        hub.requests.clear()
        by_sha = await asyncio.to_thread(download, v1)

    assert main.name == v2
    assert (main / "a.txt").read_bytes() == b"two"
    assert (main / "b.txt").read_bytes() == b"added"
    assert tagged.name == v1
    assert (tagged / "a.txt").read_bytes() == b"one"
    assert not (tagged / "b.txt").exists()
    assert by_sha == tagged
    refs = tmp_path / "models--org--rev" / "refs"
    assert (refs / "main").read_text() == v2
    assert (refs / "v1.0").read_text() == v1
    # A full sha needs no resolving, and its files were already cached: nothing was fetched.
    assert not any("/revision/" in r.path or "/resolve/" in r.path for r in hub.requests)


async def test_allow_and_ignore_patterns_fetch_only_matching_files(tmp_path: Path) -> None:
    async with HubStandIn() as hub:
        sha = hub.add_repo("org/tiny", FILES)

        def fetch(
            cache: Path, allow: list[str] | None = None, ignore: list[str] | None = None
        ) -> set[str]:
            hub.requests.clear()
            root = Path(
                snapshot_download(
                    "org/tiny",
                    endpoint=hub.endpoint,
                    cache_dir=cache,
                    token=False,
                    allow_patterns=allow,
                    ignore_patterns=ignore,
                )
            )
            got = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
            fetched = {
                r.path.split(f"/{sha}/", 1)[1]
                for r in hub.requests
                if r.method == "GET" and "/resolve/" in r.path
            }
            assert fetched == got
            return got

        allowed = await asyncio.to_thread(fetch, tmp_path / "a", ["*.json"])
        ignored = await asyncio.to_thread(fetch, tmp_path / "b", None, ["*.safetensors"])
        both = await asyncio.to_thread(fetch, tmp_path / "c", ["*.json", "sub/*"], ["token*"])
    assert allowed == {"config.json", "tokenizer.json"}
    assert ignored == {"config.json", "tokenizer.json", "sub/dir/notes.txt"}
    assert both == {"config.json", "sub/dir/notes.txt"}


async def test_model_info_and_paginated_tree_report_sizes(tmp_path: Path) -> None:
    async with HubStandIn(tree_page_size=2) as hub:
        sha = hub.add_repo("org/tiny", FILES)
        api = HfApi(endpoint=hub.endpoint, token=False)
        info = await asyncio.to_thread(api.model_info, "org/tiny", files_metadata=True, timeout=10)
        plain = await asyncio.to_thread(api.model_info, "org/tiny", revision=sha, timeout=10)
        hub.requests.clear()
        tree = await asyncio.to_thread(lambda: list(api.list_repo_tree("org/tiny", recursive=True)))
        tree_pages = [r for r in hub.requests if "/tree/" in r.path]
        top = await asyncio.to_thread(lambda: list(api.list_repo_tree("org/tiny")))

    assert info.sha == sha and plain.sha == sha
    assert info.siblings is not None and plain.siblings is not None
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes == {name: len(content) for name, content in FILES.items()}
    lfs = {s.rfilename: s.lfs for s in info.siblings if s.lfs is not None}
    weights = FILES["weights/model.safetensors"]
    assert list(lfs) == ["weights/model.safetensors"]
    assert lfs["weights/model.safetensors"].sha256 == hashlib.sha256(weights).hexdigest()
    blob_ids = {s.rfilename: s.blob_id for s in info.siblings}
    assert blob_ids["config.json"] == _git_blob_sha1(FILES["config.json"])
    # Without files_metadata the Hub sends names only.
    assert {s.rfilename for s in plain.siblings} == set(FILES)
    assert all(s.size is None for s in plain.siblings)

    files = {f.path: f for f in tree if isinstance(f, RepoFile)}
    folders = {f.path for f in tree if isinstance(f, RepoFolder)}
    assert {p: f.size for p, f in files.items()} == sizes
    assert files["weights/model.safetensors"].lfs is not None
    assert files["weights/model.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert files["config.json"].lfs is None
    assert folders == {"sub", "sub/dir", "weights"}
    # 7 entries at 2 per page: the client followed the Link header through 4 pages.
    assert len(tree_pages) == 4
    assert len(tree_pages[0].query) == 2 and "cursor" in tree_pages[1].query

    assert {(type(e).__name__, e.path) for e in top} == {
        ("RepoFile", "config.json"),
        ("RepoFile", "tokenizer.json"),
        ("RepoFolder", "sub"),
        ("RepoFolder", "weights"),
    }


async def test_file_metadata_and_ranges_follow_the_hub(tmp_path: Path) -> None:
    weights = FILES["weights/model.safetensors"]
    async with HubStandIn() as hub:
        sha = hub.add_repo("org/tiny", FILES)

        def metadata(name: str) -> tuple[str | None, int | None, str | None]:
            url = hf_hub_url("org/tiny", name, endpoint=hub.endpoint)
            meta = get_hf_file_metadata(url, token=False, endpoint=hub.endpoint)
            return meta.etag, meta.size, meta.commit_hash

        assert await asyncio.to_thread(metadata, "weights/model.safetensors") == (
            hashlib.sha256(weights).hexdigest(),
            len(weights),
            sha,
        )
        assert await asyncio.to_thread(metadata, "config.json") == (
            _git_blob_sha1(FILES["config.json"]),
            len(FILES["config.json"]),
            sha,
        )
        url = f"{hub.endpoint}/org/tiny/resolve/main/weights/model.safetensors"
        async with aiohttp.ClientSession() as session:
            async with session.head(url) as head:
                assert head.headers["ETag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
                assert head.headers["X-Linked-Size"] == str(len(weights))
                assert head.headers["Content-Length"] == str(len(weights))
            async with session.get(url, headers={"Range": "bytes=100-199"}) as part:
                assert part.status == 206
                assert part.headers["Content-Range"] == f"bytes 100-199/{len(weights)}"
                assert await part.read() == weights[100:200]
            async with session.get(url, headers={"Range": "bytes=-5"}) as tail:
                assert tail.status == 206
                assert await tail.read() == weights[-5:]
            async with session.get(url, headers={"Range": f"bytes={len(weights)}-"}) as past:
                assert past.status == 416
                assert past.headers["Content-Range"] == f"bytes */{len(weights)}"
        assert [r.range for r in hub.requests if r.method == "GET"] == [
            "bytes=100-199",
            "bytes=-5",
            f"bytes={len(weights)}-",
        ]


async def test_errors_map_to_huggingface_hub_exceptions(tmp_path: Path) -> None:
    async with HubStandIn(token=TOKEN, known_tokens=[OTHER_TOKEN]) as hub:
        hub.add_repo("org/tiny", FILES)
        hub.add_repo(
            "org/gated", {"config.json": b"{}", "model.safetensors": b"w" * 64}, gated=True
        )
        endpoint = hub.endpoint

        def snapshot(repo: str, token: str | bool = False, revision: str = "main") -> str:
            return snapshot_download(
                repo, revision=revision, endpoint=endpoint, cache_dir=tmp_path, token=token
            )

        def raised(fn: object, *args: object, **kwargs: object) -> BaseException:
            assert callable(fn)
            try:
                fn(*args, **kwargs)
            except Exception as error:
                return error
            raise AssertionError("no error")

        def check() -> None:
            # A missing repo: 401 for anonymous callers, 404 for authenticated ones, as the Hub.
            missing = raised(snapshot, "org/missing")
            assert type(missing) is RepositoryNotFoundError
            assert missing.response.status_code == 401
            missing = raised(snapshot, "org/missing", OTHER_TOKEN)
            assert type(missing) is RepositoryNotFoundError
            assert missing.response.status_code == 404
            api = HfApi(endpoint=endpoint, token=False)
            assert type(raised(api.model_info, "org/missing", timeout=10)) is (
                RepositoryNotFoundError
            )

            assert isinstance(raised(snapshot, "org/tiny", revision="v9"), RevisionNotFoundError)
            no_rev = raised(
                hf_hub_download, "org/tiny", "config.json", revision="nope",
                endpoint=endpoint, cache_dir=tmp_path, token=False,
            )  # fmt: skip
            assert isinstance(no_rev, RevisionNotFoundError)

            no_file = raised(
                hf_hub_download, "org/tiny", "missing.json",
                endpoint=endpoint, cache_dir=tmp_path, token=False,
            )  # fmt: skip
            assert isinstance(no_file, EntryNotFoundError)
            assert isinstance(no_file, HfHubHTTPError) and no_file.response.status_code == 404

            # Gated: files listed publicly, bodies refused (401 anonymous, 403 not granted).
            info = api.model_info("org/gated", timeout=10)
            assert info.gated == "manual"
            anonymous = raised(snapshot, "org/gated")
            assert isinstance(anonymous, GatedRepoError)
            assert anonymous.response.status_code == 401
            refused = raised(snapshot, "org/gated", OTHER_TOKEN)
            assert isinstance(refused, GatedRepoError)
            assert refused.response.status_code == 403
            granted = Path(snapshot("org/gated", TOKEN))
            assert (granted / "model.safetensors").read_bytes() == b"w" * 64

            # An unknown token is refused everywhere, public repos included, and is no "not found".
            invalid = raised(snapshot, "org/tiny", "hf_not_a_real_token")
            assert type(invalid) is HfHubHTTPError
            assert invalid.response.status_code == 401
            assert "Invalid credentials" in str(invalid)
            for error in (missing, refused, invalid):
                assert TOKEN not in str(error) and OTHER_TOKEN not in str(error)

        await asyncio.to_thread(check)
        assert any(r.authenticated for r in hub.requests)
        for request in hub.requests:
            assert "authorization" not in request.headers
            assert TOKEN not in repr(request) and OTHER_TOKEN not in repr(request)


async def test_lfs_files_through_cdn_redirect_drop_authorization(tmp_path: Path) -> None:
    weights = FILES["weights/model.safetensors"]
    async with HubStandIn(token=TOKEN, cdn=True) as hub:
        hub.add_repo("org/gated", FILES, gated=True)
        path = await asyncio.to_thread(
            hf_hub_download,
            "org/gated",
            "weights/model.safetensors",
            endpoint=hub.endpoint,
            cache_dir=tmp_path,
            token=TOKEN,
        )
    assert _read(path) == weights
    assert [(r.method, r.path.split("/")[1], r.authenticated) for r in hub.requests] == [
        ("HEAD", "org", True),  # 302 with X-Linked-Etag/X-Linked-Size: not followed
        ("GET", "_cdn", False),  # another origin: the token stays home
    ]


async def test_clean_close_past_a_whole_chunk_resumes_with_a_range(tmp_path: Path) -> None:
    # huggingface_hub keeps only whole 10 MiB chunks of a broken body, and resumes from there.
    big = _bytes(CHUNK + 2 * MIB, seed=2)
    async with HubStandIn() as hub:
        hub.add_repo("org/big", {"model.safetensors": big})
        hub.drop_after("model.safetensors", CHUNK + MIB)
        path = await asyncio.to_thread(
            hf_hub_download,
            "org/big",
            "model.safetensors",
            endpoint=hub.endpoint,
            cache_dir=tmp_path,
            token=False,
        )
    assert _read(path) == big
    gets = [r.range for r in hub.requests if r.method == "GET"]
    assert gets == [None, f"bytes={CHUNK}-"]
    assert hub.bytes_served == (CHUNK + MIB) + (len(big) - CHUNK)
    assert _cache_files(tmp_path, ".incomplete") == []


async def test_clean_close_inside_the_first_chunk_restarts_the_file(tmp_path: Path) -> None:
    weights = FILES["weights/model.safetensors"]
    async with HubStandIn() as hub:
        hub.add_repo("org/tiny", FILES)
        hub.drop_after("model.safetensors", MIB)
        root = await asyncio.to_thread(
            snapshot_download, "org/tiny", endpoint=hub.endpoint, cache_dir=tmp_path, token=False
        )
    assert (Path(root) / "weights/model.safetensors").read_bytes() == weights
    gets = [r.range for r in hub.requests if r.method == "GET" and "safetensors" in r.path]
    assert gets == [None, None]  # nothing whole was kept: the retry asks for everything again
    assert hub.bytes_served == sum(len(c) for c in FILES.values()) + MIB


async def test_reset_mid_body_escapes_as_read_error_and_leaves_no_blob(tmp_path: Path) -> None:
    big = _bytes(CHUNK + 2 * MIB, seed=3)
    async with HubStandIn() as hub:
        hub.add_repo("org/big", {"model.safetensors": big})
        hub.drop_after("model.safetensors", CHUNK + MIB, reset=True)
        with pytest.raises(httpx2.ReadError):
            await asyncio.to_thread(
                hf_hub_download,
                "org/big",
                "model.safetensors",
                endpoint=hub.endpoint,
                cache_dir=tmp_path,
                token=False,
            )
    assert [r.range for r in hub.requests if r.method == "GET"] == [None]  # no retry
    storage = tmp_path / "models--org--big"
    assert list((storage / "blobs").iterdir()) == []
    assert _cache_files(tmp_path, ".incomplete") == []
    assert not any(p.is_file() for p in (storage / "snapshots").rglob("*"))


async def test_status_faults_503_is_final_on_a_body_429_is_retried(tmp_path: Path) -> None:
    async with HubStandIn() as hub:
        hub.add_repo("org/tiny", FILES)
        hub.fail_status("config.json", 503, method="GET")

        def download(cache: Path) -> str:
            return hf_hub_download(
                "org/tiny", "config.json", endpoint=hub.endpoint, cache_dir=cache, token=False
            )

        with pytest.raises(HfHubHTTPError) as failed:
            await asyncio.to_thread(download, tmp_path / "a")
        assert failed.value.response.status_code == 503
        assert [r.method for r in hub.requests] == ["HEAD", "GET"]

        hub.requests.clear()
        hub.fail_status("config.json", 429, method="GET")
        path = await asyncio.to_thread(download, tmp_path / "b")
        assert _read(path) == FILES["config.json"]
        assert [r.method for r in hub.requests] == ["HEAD", "GET", "GET"]
        assert hub.faults == []


async def test_throttle_paces_all_bodies_through_one_link(tmp_path: Path) -> None:
    files = {"a.bin": _bytes(192 * 1024, seed=4), "b.bin": _bytes(192 * 1024, seed=5)}
    total = sum(len(c) for c in files.values())
    rate = 768 * 1024  # bytes per second: both files together need 0.5 s
    async with HubStandIn() as hub:
        hub.add_repo("org/slow", files)
        hub.throttle(rate)
        started = time.monotonic()
        download = asyncio.ensure_future(
            asyncio.to_thread(
                snapshot_download,
                "org/slow",
                endpoint=hub.endpoint,
                cache_dir=tmp_path,
                token=False,
            )
        )
        progress = set()
        while not download.done():
            progress.add(hub.bytes_served)
            await asyncio.sleep(0.02)
        root = Path(await download)
        elapsed = time.monotonic() - started
    for name, content in files.items():
        assert (root / name).read_bytes() == content
    assert elapsed >= 0.9 * total / rate
    assert elapsed < total / rate + 5
    assert any(0 < seen < total for seen in progress)  # a watcher sees the bytes arrive


async def test_cli_serves_a_folder_and_prints_its_endpoint_first(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    (folder / "nested").mkdir(parents=True)
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_bytes(b"ref: refs/heads/main\n")
    files = {"config.json": b'{"a": 1}', "nested/model.safetensors": _bytes(4096, seed=6)}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pluggably.devtools.standins.hub",
        "--port",
        "0",
        "--repo",
        f"org/cli={folder}",
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "server")},
    )
    try:
        assert process.stdout is not None
        endpoint = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
        assert endpoint.startswith("http://127.0.0.1:")
        root = Path(
            await asyncio.to_thread(
                snapshot_download,
                "org/cli",
                endpoint=endpoint,
                cache_dir=tmp_path / "cache",
                token=False,
            )
        )
        assert _files_under(root) == files
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
