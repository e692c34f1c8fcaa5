"""Local execution: models that Pluggably runs itself, served as provider `local`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pluggably.core import plugins
from pluggably.runners.config import LocalConfig

if TYPE_CHECKING:
    from pluggably.core.backend import Backend

LOCAL_PROVIDER = "local"


def _build(provider: str, section: LocalConfig) -> Backend:
    # Imported here: the runner module is cheap, but nothing local is needed without local models.
    from pluggably.runners.transformers_text import LocalTextModel, TransformersTextBackend

    return TransformersTextBackend(
        [
            LocalTextModel(
                name=m.name,
                path=m.path,
                device=m.device,
                dtype=m.dtype,
                max_concurrency=m.max_concurrency,
                max_queue=m.max_queue,
                queue_timeout_s=m.queue_timeout_s,
                default_max_tokens=m.default_max_tokens,
                context_length=m.context_length,
                description=m.description,
            )
            for m in section.models
        ],
        provider=provider,
    )


LOCAL_KIND = plugins.register(
    plugins.BackendKind(
        name=LOCAL_PROVIDER,
        config_model=LocalConfig,
        factory=_build,
        description="models run by Pluggably itself (transformers on CPU or GPU)",
    )
)
