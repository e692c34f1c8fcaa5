"""A local stand-in for the Hugging Face Hub, so the real `huggingface_hub` library (2.4) can
download from it in tests: model info, tree listings, file metadata and file bodies, with the
headers, status codes and `X-Error-Code` values the library branches on.

Tests drive it in-process::

    async with HubStandIn(token="hf_granted") as hub:
        sha = hub.add_repo("org/tiny", {"config.json": b"{}", "model.safetensors": weights})
        hub.drop_after("model.safetensors", 1 << 20)        # close mid-body once
        path = await asyncio.to_thread(
            snapshot_download, "org/tiny", endpoint=hub.endpoint, cache_dir=tmp, token=False
        )
        assert hub.requests[-1].range is None

and a gateway subprocess can be pointed at one started from the command line
(`python -m pluggably.devtools.standins.hub --port 0 --repo org/tiny=DIR`, which prints the
endpoint as its first line of output).

Key design decisions:
- One catch-all route parses the raw (still percent-encoded) path itself. huggingface_hub
  encodes a revision with `quote(revision, safe="")` (so `refs/pr/1` arrives as `refs%2Fpr%2F1`)
  but leaves the `/` of a file path in the clear; only the raw path tells those apart.
- Content-addressed like git: a regular file's id is its git blob sha1; a file tracked by Git LFS
  (the Hub's default `.gitattributes` patterns, or anything over 10 MiB, which the Hub refuses to
  store outside LFS) also has a sha256, which becomes its ETag and its cache blob name. Commit
  shas are derived from the parent commit and the file ids, so the same content gives the same
  sha in every run.
- Errors are what the Hub sends, because huggingface_hub picks its exception by `X-Error-Code`
  (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) and its message from
  `X-Error-Message` and the JSON body `{"error": ...}`. A missing repo answers 401 to anonymous
  callers and 404 to authenticated ones, as the Hub does so as not to reveal private repos;
  both become `RepositoryNotFoundError`. A gated repo lists its files publicly but refuses its
  file bodies: 401 without a token, 403 with a valid token that was not granted access. A token
  the stand-in does not know gets 401 "Invalid credentials in Authorization header" everywhere,
  public repos included.
- LFS files are served directly by default (200 with `X-Linked-Etag`/`X-Linked-Size`). With
  `cdn=True` they redirect (302) to `http://localhost:<port>/_cdn/<sha256>` like the Hub
  redirects to its CDN: a different origin to huggingface_hub, which therefore reads the file's
  metadata from the redirect and drops the Authorization header for the download itself.
- Faults and throttling act on file bodies, where downloads break in practice: `drop_after`
  cuts a body after n bytes (a clean close, or a TCP reset), `throttle` paces every body
  through one shared link of a given bandwidth. `fail_status` answers any matching request.
- Secrets: the Authorization header is never recorded (`HubRequest.authenticated` says whether
  one was sent) and never appears in an error message.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fnmatch
import hashlib
import itertools
import os
import re
import signal
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import quote, unquote, urlencode

import orjson
from aiohttp import web

# The Hub's default `.gitattributes` for a new model repo: files matching these are LFS files.
LFS_PATTERNS: tuple[str, ...] = (
    "*.7z",
    "*.arrow",
    "*.bin",
    "*.bz2",
    "*.ckpt",
    "*.ftz",
    "*.gguf",
    "*.gz",
    "*.h5",
    "*.joblib",
    "*.lfs.*",
    "*.mlmodel",
    "*.model",
    "*.msgpack",
    "*.npy",
    "*.npz",
    "*.onnx",
    "*.ot",
    "*.parquet",
    "*.pb",
    "*.pickle",
    "*.pkl",
    "*.pt",
    "*.pth",
    "*.rar",
    "*.safetensors",
    "*.tar",
    "*.tar.*",
    "*.tflite",
    "*.tgz",
    "*.wasm",
    "*.xz",
    "*.zip",
    "*.zst",
    "*tfevents*",
)
# The Hub rejects regular (non-LFS) git files above this size.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
# What the Hub returns per tree page (1000 entries, cursor-paginated with a `Link` header).
DEFAULT_TREE_PAGE_SIZE = 1000

_CHUNK = 64 * 1024
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_API_MODELS = re.compile(
    r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)"
    r"(?:/(?P<op>revision|tree)/(?P<rev>[^/]+)(?P<sub>/.*)?)?$"
)
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CDN = re.compile(r"^/_cdn/(?P<sha256>[0-9a-f]{64})$")
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_TRUE = {"1", "true", "yes"}

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


@dataclass(frozen=True)
class HubRequest:
    """One request the stand-in received (the Authorization header is never kept)."""

    method: str
    path: str  # decoded
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names, without `authorization`
    range: str | None  # the Range header as sent
    authenticated: bool  # whether an Authorization header came with it
    at: float  # time.monotonic() on arrival


@dataclass
class HubFault:
    """An injected failure, applied to the next `times` requests whose decoded path contains
    `path` (and whose method is `method`, when set)."""

    kind: Literal["status", "drop"]
    path: str
    times: int = 1
    status: int = 500
    nbytes: int = 0
    reset: bool = False  # drop: a TCP reset instead of a clean close
    method: str | None = None


class _Blob:
    """One file's content and its git identities. Bytes live in memory or in a file on disk."""

    def __init__(self, name: str, source: bytes | Path) -> None:
        self.data = source if isinstance(source, bytes) else None
        self.source = source if isinstance(source, Path) else None
        self.size = len(source) if isinstance(source, bytes) else source.stat().st_size
        sha256 = hashlib.sha256()
        git_oid = hashlib.sha1(f"blob {self.size}\0".encode())
        for chunk in self.chunks(0, self.size, 1024 * 1024):
            sha256.update(chunk)
            git_oid.update(chunk)
        self.sha256 = sha256.hexdigest()
        self.lfs = self.size > LFS_SIZE_THRESHOLD or any(
            fnmatch.fnmatch(name.rsplit("/", 1)[-1], pattern) for pattern in LFS_PATTERNS
        )
        self.pointer_size = 0
        if self.lfs:
            # Git stores an LFS file as a pointer: the blob id is the pointer's, not the file's.
            pointer = (
                "version https://git-lfs.github.com/spec/v1\n"
                f"oid sha256:{self.sha256}\nsize {self.size}\n"
            ).encode()
            self.pointer_size = len(pointer)
            git_oid = hashlib.sha1(f"blob {len(pointer)}\0".encode() + pointer)
        self.git_oid = git_oid.hexdigest()

    @property
    def etag(self) -> str:
        """What the Hub puts in ETag: the sha256 for LFS files, the git blob id otherwise."""
        return self.sha256 if self.lfs else self.git_oid

    def chunks(self, start: int, end: int, size: int) -> Iterator[bytes]:
        """The bytes [start, end) in pieces of at most `size`."""
        if self.data is not None:
            for offset in range(start, end, size):
                yield self.data[offset : min(offset + size, end)]
            return
        assert self.source is not None
        with self.source.open("rb") as f:
            f.seek(start)
            position = start
            while position < end:
                piece = f.read(min(size, end - position))
                if not piece:
                    raise OSError(f"{self.source} shrank while being served")
                position += len(piece)
                yield piece


@dataclass
class _Commit:
    sha: str
    files: dict[str, _Blob]
    at: datetime

    def folders(self) -> set[str]:
        return {
            "/".join(parts[:i])
            for parts in (path.split("/") for path in self.files)
            for i in range(1, len(parts))
        }


@dataclass
class _Repo:
    repo_id: str
    gated: bool
    created_at: datetime
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> _Commit | None:
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and _COMMIT_SHA.fullmatch(revision):
            sha = revision
        return self.commits.get(sha) if sha is not None else None


class _EndBody(Exception):
    """A drop fault cut the body on purpose: the response ends here, without an error."""


class HubStandIn:
    """An aiohttp server on 127.0.0.1 imitating the Hub's download API for models.

    `token` is the one token granted access to gated repos; `known_tokens` are further valid
    tokens that were not granted access (they get 403 on gated files). Any other bearer token is
    invalid (401 everywhere). Everything a test can inspect is public state: `requests`,
    `bytes_served` (file body bytes written), `active_bodies` (file bodies being sent now) and
    `aborted_bodies` (bodies the client abandoned).

    The state is owned by the event loop that serves: add repos and faults from that loop (a
    test does, between `await`s), while huggingface_hub runs in threads (`asyncio.to_thread`).
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        known_tokens: Iterable[str] = (),
        cdn: bool = False,
        tree_page_size: int = DEFAULT_TREE_PAGE_SIZE,
    ) -> None:
        self.token = token
        self.known_tokens = frozenset(known_tokens)
        self.cdn = cdn
        self.tree_page_size = tree_page_size
        self.requests: list[HubRequest] = []
        self.faults: list[HubFault] = []
        self.bytes_served = 0
        self.active_bodies = 0
        self.aborted_bodies = 0
        self.port: int | None = None
        self._host = "127.0.0.1"
        self._repos: dict[str, _Repo] = {}
        self._bytes_per_second: float | None = None
        self._link_free_at = 0.0
        self._request_ids = itertools.count(1)
        self._runner: web.AppRunner | None = None

    # ---- content -------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | Path],
        *,
        revision: str = "main",
        tags: Iterable[str] = (),
        gated: bool = False,
    ) -> str:
        """Commits `files` (the whole tree: path -> bytes, or a Path to serve from disk) on
        branch `revision` of model repo `repo_id`, creating the repo if needed, and points each
        of `tags` at the new commit. Returns the commit sha; earlier commits stay reachable by
        their sha and tags. The repo is gated or not as the latest call says."""
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
            raise ValueError(f"not a repo id: {repo_id!r}")
        if _COMMIT_SHA.fullmatch(revision):
            raise ValueError("revision names a branch; commit shas are computed")
        for path in files:
            parts = path.split("/")
            if not path or any(part in ("", ".", "..") for part in parts):
                raise ValueError(f"not a relative file path: {path!r}")
        now = datetime.now(UTC)
        repo = self._repos.setdefault(repo_id, _Repo(repo_id, gated, now))
        repo.gated = gated
        if revision in repo.tags:
            raise ValueError(f"{revision!r} is a tag of {repo_id}, not a branch")
        blobs = {path: _Blob(path, files[path]) for path in sorted(files)}
        parent = repo.branches.get(revision, "")
        digest = hashlib.sha1(f"{repo_id}\n{parent}\n".encode())
        for path, blob in blobs.items():
            digest.update(f"{path}\0{blob.git_oid}\n".encode())
        sha = digest.hexdigest()
        repo.commits[sha] = _Commit(sha, blobs, now)
        repo.branches[revision] = sha
        for tag in tags:
            if tag in repo.branches:
                raise ValueError(f"{tag!r} is a branch of {repo_id}, not a tag")
            repo.tags[tag] = sha
        return sha

    def add_folder(
        self,
        repo_id: str,
        folder: str | os.PathLike[str],
        *,
        revision: str = "main",
        tags: Iterable[str] = (),
        gated: bool = False,
    ) -> str:
        """`add_repo` with every file under `folder` (served from disk; `.git/` and
        `.cache/` are left out, symlinks followed, so a Hub cache snapshot folder works)."""
        root = Path(folder)
        if not root.is_dir():
            raise ValueError(f"not a folder: {root}")
        files: dict[str, bytes | Path] = {}
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            if relative.parts[0] in (".git", ".cache") or not path.is_file():
                continue
            files[relative.as_posix()] = path
        return self.add_repo(repo_id, files, revision=revision, tags=tags, gated=gated)

    # ---- faults --------------------------------------------------------------------------

    def drop_after(
        self, path_substring: str, nbytes: int, times: int = 1, *, reset: bool = False
    ) -> None:
        """The next `times` file bodies whose path contains `path_substring` stop after
        `nbytes` bytes: the connection is closed cleanly (huggingface_hub sees an incomplete
        body) or, with `reset`, reset (the client sees a read error)."""
        self.faults.append(
            HubFault("drop", path_substring, times, nbytes=nbytes, reset=reset, method="GET")
        )

    def fail_status(
        self, path_substring: str, status: int, times: int = 1, *, method: str | None = None
    ) -> None:
        """The next `times` requests (of `method`, when given) whose path contains
        `path_substring` get `status` with a Hub-style JSON error body."""
        self.faults.append(HubFault("status", path_substring, times, status=status, method=method))

    def throttle(self, bytes_per_second: float | None) -> None:
        """Limits all file bodies together to `bytes_per_second` (None: no limit)."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive")
        self._bytes_per_second = bytes_per_second

    def clear_faults(self) -> None:
        """Removes every pending fault and lifts the throttle."""
        self.faults.clear()
        self._bytes_per_second = None

    def _take_fault(self, kind: str, request: web.Request) -> HubFault | None:
        for fault in self.faults:
            if (
                fault.kind == kind
                and fault.path in request.path
                and (fault.method is None or fault.method == request.method)
            ):
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    # ---- server --------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The base URL to pass as `endpoint=` to huggingface_hub."""
        if self.port is None:
            raise RuntimeError("the hub stand-in is not started")
        return f"http://{self._host}:{self.port}"

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A short shutdown timeout: a test that abandons a throttled download must not make
        # stop() wait a minute for that body to finish.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self._host = host
        self.port = self._runner.addresses[0][1]
        return self.endpoint

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> HubStandIn:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- request handling ----------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(
            HubRequest(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers={
                    k.lower(): v for k, v in request.headers.items() if k.lower() != "authorization"
                },
                range=request.headers.get("Range"),
                authenticated="Authorization" in request.headers,
                at=time.monotonic(),
            )
        )
        fault = self._take_fault("status", request)
        if fault is not None:
            return self._error(fault.status, _STATUS_MESSAGES.get(fault.status, "Server error"))
        raw_path = request.rel_url.raw_path
        if request.method not in ("GET", "HEAD"):
            return self._error(405, "Method not allowed")
        if match := _CDN.match(raw_path):
            return await self._cdn(request, match["sha256"])
        if match := _RESOLVE.match(raw_path):
            return await self._resolve(
                request, unquote(match["repo"]), unquote(match["rev"]), unquote(match["path"])
            )
        if request.method == "GET" and (match := _API_MODELS.match(raw_path)):
            revision = unquote(match["rev"]) if match["rev"] else "main"
            if match["op"] == "tree":
                sub = unquote(match["sub"] or "").strip("/")
                return self._tree(request, unquote(match["repo"]), revision, sub)
            if match["sub"]:
                return self._error(404, "Not Found")
            return self._model_info(request, unquote(match["repo"]), revision)
        return self._error(404, "Not Found")

    def _access(self, request: web.Request) -> tuple[str | None, web.Response | None]:
        """(the access level, or an error response): "anonymous", "granted" or "known"."""
        header = request.headers.get("Authorization")
        if header is None:
            return "anonymous", None
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            if self.token is not None and value == self.token:
                return "granted", None
            if value in self.known_tokens:
                return "known", None
        return None, self._error(401, INVALID_CREDENTIALS)

    def _lookup(
        self, request: web.Request, repo_id: str, revision: str
    ) -> tuple[_Repo, _Commit, str] | web.Response:
        access, denied = self._access(request)
        if denied is not None:
            return denied
        repo = self._repos.get(repo_id)
        if repo is None:
            # The Hub answers 401 to anonymous callers so as not to reveal private repos.
            return self._error(
                401 if access == "anonymous" else 404, "Repository not found", "RepoNotFound"
            )
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        assert access is not None
        return repo, commit, access

    def _model_info(self, request: web.Request, repo_id: str, revision: str) -> web.Response:
        found = self._lookup(request, repo_id, revision)
        if isinstance(found, web.Response):
            return found
        repo, commit, _ = found
        blobs = request.query.get("blobs", "").lower() in _TRUE
        siblings = []
        for path, blob in commit.files.items():
            sibling: dict[str, object] = {"rfilename": path}
            if blobs:
                sibling["size"] = blob.size
                sibling["blobId"] = blob.git_oid
                if blob.lfs:
                    sibling["lfs"] = {
                        "size": blob.size,
                        "sha256": blob.sha256,
                        "pointerSize": blob.pointer_size,
                    }
            siblings.append(sibling)
        author = repo_id.split("/")[0] if "/" in repo_id else None
        body = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": author,
            "sha": commit.sha,
            "lastModified": _timestamp(commit.at),
            "createdAt": _timestamp(repo.created_at),
            "private": False,
            "disabled": False,
            "gated": "manual" if repo.gated else False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(blob.size for blob in commit.files.values()),
        }
        return self._json(body)

    def _tree(self, request: web.Request, repo_id: str, revision: str, sub: str) -> web.Response:
        found = self._lookup(request, repo_id, revision)
        if isinstance(found, web.Response):
            return found
        _, commit, _ = found
        folders = commit.folders()
        if sub and sub not in folders:
            if sub in commit.files:
                return self._error(400, f"{sub} is a file, not a directory")
            return self._error(
                404, f"{sub} does not exist on {revision}", "EntryNotFound", commit.sha
            )
        prefix = f"{sub}/" if sub else ""
        recursive = request.query.get("recursive", "").lower() in _TRUE
        entries: list[dict[str, object]] = []
        for folder in sorted(folders):
            if folder.startswith(prefix) and (recursive or "/" not in folder[len(prefix) :]):
                oid = hashlib.sha1(f"{commit.sha}:{folder}".encode()).hexdigest()
                entries.append({"type": "directory", "oid": oid, "size": 0, "path": folder})
        for path, blob in commit.files.items():
            if path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :]):
                entry: dict[str, object] = {
                    "type": "file",
                    "oid": blob.git_oid,
                    "size": blob.size,
                    "path": path,
                }
                if blob.lfs:
                    entry["lfs"] = {
                        "oid": blob.sha256,
                        "size": blob.size,
                        "pointerSize": blob.pointer_size,
                    }
                entries.append(entry)
        start = _decode_cursor(request.query.get("cursor"))
        page = entries[start : start + self.tree_page_size]
        headers: dict[str, str] = {}
        if start + self.tree_page_size < len(entries):
            query = {k: v for k, v in request.query.items() if k != "cursor"}
            query["cursor"] = _encode_cursor(start + self.tree_page_size)
            url = request.url.with_query(None)
            headers["Link"] = f'<{url}?{urlencode(query)}>; rel="next"'
        return self._json(page, headers=headers)

    async def _resolve(
        self, request: web.Request, repo_id: str, revision: str, path: str
    ) -> web.StreamResponse:
        found = self._lookup(request, repo_id, revision)
        if isinstance(found, web.Response):
            return found
        repo, commit, access = found
        if repo.gated and access != "granted":
            # The Hub checks access before the file: a gated repo's missing file is also 401/403.
            if access == "anonymous":
                message = (
                    f"Access to model {repo_id} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in."
                )
                return self._error(401, message, "GatedRepo")
            message = (
                f"Access to model {repo_id} is restricted and you are not in the authorized "
                f"list. Visit {self.endpoint}/{repo_id} to ask for access."
            )
            return self._error(403, message, "GatedRepo")
        blob = commit.files.get(path)
        if blob is None:
            return self._error(404, "Entry not found", "EntryNotFound", commit.sha)
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": _content_disposition(path),
        }
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(blob.size)
            if self.cdn:
                headers["Location"] = (
                    f"http://localhost:{self.port}/_cdn/{blob.sha256}?"
                    + urlencode({"response-content-disposition": _content_disposition(path)})
                )
                del headers["Accept-Ranges"], headers["Content-Type"]
                return web.Response(status=302, headers=self._with_request_id(headers))
        return await self._send_blob(request, blob, headers)

    async def _cdn(self, request: web.Request, sha256: str) -> web.StreamResponse:
        # A signed CDN URL: no authorization needed, and the Hub's own headers are absent.
        for repo in self._repos.values():
            for commit in repo.commits.values():
                for path, blob in commit.files.items():
                    if blob.lfs and blob.sha256 == sha256:
                        headers = {
                            "ETag": f'"{blob.sha256}"',
                            "Accept-Ranges": "bytes",
                            "Content-Type": "application/octet-stream",
                            "Content-Disposition": _content_disposition(path),
                        }
                        return await self._send_blob(request, blob, headers)
        return self._error(404, "Not Found")

    async def _send_blob(
        self, request: web.Request, blob: _Blob, headers: dict[str, str]
    ) -> web.StreamResponse:
        start, end, status = 0, blob.size, 200
        requested = request.headers.get("Range")
        if requested is not None and (match := _RANGE.match(requested)):
            first, last = match.groups()
            if first:
                start = int(first)
                end = min(int(last) + 1, blob.size) if last else blob.size
            elif last:
                start = max(blob.size - int(last), 0)
            if (first or last) and (start >= blob.size or start >= end):
                return self._error(416, "Range Not Satisfiable", content_range=blob.size)
            if first or last:
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        response = web.StreamResponse(status=status, headers=self._with_request_id(headers))
        response.content_length = end - start
        if request.method == "HEAD":
            await response.prepare(request)
            await response.write_eof()
            return response
        drop = self._take_fault("drop", request)
        await response.prepare(request)
        self.active_bodies += 1
        try:
            await self._write_body(request, response, blob, start, end, drop)
        except _EndBody:
            pass
        except (ConnectionError, asyncio.CancelledError):
            self.aborted_bodies += 1
            raise
        finally:
            self.active_bodies -= 1
        return response

    async def _write_body(
        self,
        request: web.Request,
        response: web.StreamResponse,
        blob: _Blob,
        start: int,
        end: int,
        drop: HubFault | None,
    ) -> None:
        chunk_size = _CHUNK
        if self._bytes_per_second is not None:
            # Small pieces when paced, so a reader sees the bytes arrive steadily.
            chunk_size = max(1024, min(_CHUNK, int(self._bytes_per_second / 20)))
        budget = drop.nbytes if drop is not None else None
        for chunk in blob.chunks(start, end, chunk_size):
            if budget is not None and len(chunk) >= budget:
                chunk = chunk[:budget]
                if chunk:
                    await self._pace(len(chunk))
                    await response.write(chunk)
                    self.bytes_served += len(chunk)
                assert drop is not None
                _cut(request, reset=drop.reset)
                raise _EndBody
            await self._pace(len(chunk))
            await response.write(chunk)
            self.bytes_served += len(chunk)
            if budget is not None:
                budget -= len(chunk)
        await response.write_eof()

    async def _pace(self, nbytes: int) -> None:
        if self._bytes_per_second is None:
            return
        now = asyncio.get_running_loop().time()
        # One shared link: a chunk leaves once every earlier chunk has, at the link's rate.
        self._link_free_at = max(now, self._link_free_at) + nbytes / self._bytes_per_second
        await asyncio.sleep(self._link_free_at - now)

    # ---- response helpers ----------------------------------------------------------------

    def _with_request_id(self, headers: dict[str, str]) -> dict[str, str]:
        headers["X-Request-Id"] = f"Root=1-standin-{next(self._request_ids):08d}"
        return headers

    def _json(self, data: object, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(
            body=orjson.dumps(data),
            content_type="application/json",
            headers=self._with_request_id(dict(headers or {})),
        )

    def _error(
        self,
        status: int,
        message: str,
        code: str | None = None,
        commit: str | None = None,
        *,
        content_range: int | None = None,
    ) -> web.Response:
        headers = {"X-Error-Message": message}
        if code is not None:
            headers["X-Error-Code"] = code
        if commit is not None:
            # The Hub says which commit a missing file was looked up in (the client caches it).
            headers["X-Repo-Commit"] = commit
        if content_range is not None:
            headers["Content-Range"] = f"bytes */{content_range}"
        return web.Response(
            status=status,
            body=orjson.dumps({"error": message}),
            content_type="application/json",
            headers=self._with_request_id(headers),
        )


_STATUS_MESSAGES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    429: "You have exceeded our hourly quotas for action: resolve.",
    500: "Internal Error - We're working hard to fix this as soon as possible!",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _cut(request: web.Request, *, reset: bool) -> None:
    """Ends the connection mid-body: a FIN after the bytes already written, or an RST."""
    transport = request.transport
    if transport is None:
        return
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: closing sends RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()


def _timestamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def _content_disposition(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "")
    return f"inline; filename*=UTF-8''{quote(name)}; filename=\"{ascii_name}\";"


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"offset": offset})).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    with contextlib.suppress(ValueError, orjson.JSONDecodeError, AttributeError, TypeError):
        data = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return max(0, int(data["offset"]))
    return 0


# ---- command line ------------------------------------------------------------------------


def _parse_repo(value: str) -> tuple[str, Path]:
    repo_id, sep, folder = value.partition("=")
    if not sep or not repo_id or not folder:
        raise argparse.ArgumentTypeError(f"expected REPO_ID=DIR, got {value!r}")
    return repo_id, Path(folder)


async def _serve(args: argparse.Namespace) -> None:
    hub = HubStandIn(token=args.token, known_tokens=args.known_token, cdn=args.cdn)
    gated = set(args.gated)
    for repo_id, folder in args.repo:
        hub.add_folder(repo_id, folder, gated=repo_id in gated)
    if args.throttle:
        hub.throttle(args.throttle)
    await hub.start(args.port, args.host)
    print(hub.endpoint, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await hub.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pluggably.devtools.standins.hub",
        description="Serve folders as Hugging Face Hub model repos (prints the endpoint first).",
    )
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--repo", type=_parse_repo, action="append", default=[], metavar="REPO_ID=DIR"
    )
    parser.add_argument("--gated", action="append", default=[], metavar="REPO_ID")
    parser.add_argument("--token", default=None, help="the token granted access to gated repos")
    parser.add_argument("--known-token", action="append", default=[], help="valid, not granted")
    parser.add_argument("--throttle", type=float, default=None, help="bytes per second")
    parser.add_argument("--cdn", action="store_true", help="redirect LFS files to /_cdn/")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
