"""What an API key may do: the scopes, and the scope each RPC requires.

Transport-free on purpose (no grpc, no `*_pb2`): the auth hook looks a method up by its full gRPC
name. `tests/test_keys.py` walks the service descriptors, so an RPC added to the contract without
an entry here fails the suite instead of being silently denied (or allowed) at run time.
"""

from __future__ import annotations

from collections.abc import Iterable

GENERATE = "generate"
MODELS_READ = "models:read"
MODELS_WRITE = "models:write"
STORAGE_READ = "storage:read"
STORAGE_ADMIN = "storage:admin"
ADMIN = "admin"

# Meaning of each scope, in the words `pluggably keys` and the README use.
SCOPE_MEANINGS: dict[str, str] = {
    GENERATE: "generate text, images and meshes (unary and streaming)",
    MODELS_READ: "list and inspect models, their parameters and downloads",
    MODELS_WRITE: "download, cancel, delete, pin and rescan models",
    STORAGE_READ: "see storage usage; list, inspect and read artifacts",
    STORAGE_ADMIN: "prune storage and delete artifacts",
    ADMIN: "every scope above",
}

SCOPES: tuple[str, ...] = tuple(SCOPE_MEANINGS)

_PKG = "/pluggably.v1."

# Full gRPC method name -> the one scope it requires. Every RPC of the four services is here.
METHOD_SCOPES: dict[str, str] = {
    f"{_PKG}GenerateService/Generate": GENERATE,
    f"{_PKG}StreamService/StreamGenerate": GENERATE,
    f"{_PKG}ModelService/ListModels": MODELS_READ,
    f"{_PKG}ModelService/GetModel": MODELS_READ,
    f"{_PKG}ModelService/GetModelParameters": MODELS_READ,
    f"{_PKG}ModelService/GetDownload": MODELS_READ,
    f"{_PKG}ModelService/WatchDownload": MODELS_READ,
    f"{_PKG}ModelService/DownloadModel": MODELS_WRITE,
    f"{_PKG}ModelService/CancelDownload": MODELS_WRITE,
    f"{_PKG}ModelService/DeleteModel": MODELS_WRITE,
    f"{_PKG}ModelService/RescanModels": MODELS_WRITE,
    f"{_PKG}ModelService/ListDownloads": MODELS_READ,
    f"{_PKG}ModelService/PinModel": MODELS_WRITE,
    f"{_PKG}ModelService/UnpinModel": MODELS_WRITE,
    f"{_PKG}StorageService/GetStorageUsage": STORAGE_READ,
    f"{_PKG}StorageService/ListArtifacts": STORAGE_READ,
    f"{_PKG}StorageService/GetArtifact": STORAGE_READ,
    f"{_PKG}StorageService/ReadArtifact": STORAGE_READ,
    f"{_PKG}StorageService/PruneStorage": STORAGE_ADMIN,
    f"{_PKG}StorageService/DeleteArtifact": STORAGE_ADMIN,
}

# Services that are open by default (`auth.public_health`, `auth.public_reflection`); they need
# no scope, only a valid key, when the operator closes them.
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES: tuple[str, ...] = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)

_ALL = frozenset(SCOPES)


def required_scope(method: str) -> str | None:
    """The scope `method` (`/pluggably.v1.GenerateService/Generate`) requires; None for a method
    this table does not know, which the caller must deny."""
    return METHOD_SCOPES.get(method)


def needs_key_only(method: str) -> bool:
    """True for health and reflection methods: when the operator closes them they need a valid
    key, but no scope (they are not in `METHOD_SCOPES`)."""
    service = method.lstrip("/").split("/", 1)[0]
    return service == HEALTH_SERVICE or service in REFLECTION_SERVICES


def unknown_scopes(scopes: Iterable[str]) -> list[str]:
    """The entries of `scopes` that are not scopes, in their order, without repeats."""
    return list(dict.fromkeys(s for s in scopes if s not in _ALL))


def expand(scopes: Iterable[str]) -> frozenset[str]:
    """The scopes a key holding `scopes` has: `admin` implies every scope."""
    held = frozenset(scopes)
    return _ALL if ADMIN in held else held & _ALL
