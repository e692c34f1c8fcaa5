"""Local execution: models that Pluggably runs itself, served as provider `local`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pluggably.core import plugins
from pluggably.runners.config import LocalConfig, RemoteConfig

if TYPE_CHECKING:
    from pluggably.catalog.registry import ModelRegistry
    from pluggably.core.backend import Backend
    from pluggably.runners.local import LocalBackend

LOCAL_PROVIDER = "local"


def _build(provider: str, section: LocalConfig) -> Backend:
    # Imported here: cheap (torch comes with the first model used), but not needed without it.
    from pluggably.runners.local import LocalBackend

    return LocalBackend(section.models, provider=provider, workers=section.workers)


def build_local_backend(section: LocalConfig, registry: ModelRegistry | None) -> LocalBackend:
    """The `local` backend over the config's models and the registry's."""
    from pluggably.runners.local import LocalBackend

    return LocalBackend(
        section.models, registry=registry, provider=LOCAL_PROVIDER, workers=section.workers
    )


def _build_remote(provider: str, section: RemoteConfig) -> Backend:
    import os

    import grpc

    from pluggably.core.types import Modality, ModelInfo
    from pluggably.runners.remote import RemoteBackend

    credentials = None
    if section.ca_file is not None:
        credentials = grpc.ssl_channel_credentials(section.ca_file.read_bytes())
    key = os.environ.get(section.api_key_env) if section.api_key_env else None
    return RemoteBackend(
        provider,
        section.target,
        models=[
            ModelInfo(
                provider=provider,
                name=m.name,
                modality=Modality(m.modality),
                description=m.description,
            )
            for m in section.models
        ],
        credentials=credentials,
        api_key=key,
    )


REMOTE_KIND = plugins.register(
    plugins.BackendKind(
        name="remote",
        config_model=RemoteConfig,
        factory=_build_remote,
        description="another server of the v1 contract (a runner on another machine)",
    )
)

LOCAL_KIND = plugins.register(
    plugins.BackendKind(
        name=LOCAL_PROVIDER,
        config_model=LocalConfig,
        factory=_build,
        description="models run by Pluggably itself (transformers on CPU or GPU)",
    )
)
