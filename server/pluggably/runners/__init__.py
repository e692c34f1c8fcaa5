"""Local execution: models that Pluggably runs itself, served as provider `local`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pluggably.core import plugins
from pluggably.runners.config import LocalConfig

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


LOCAL_KIND = plugins.register(
    plugins.BackendKind(
        name=LOCAL_PROVIDER,
        config_model=LocalConfig,
        factory=_build,
        description="models run by Pluggably itself (transformers on CPU or GPU)",
    )
)
