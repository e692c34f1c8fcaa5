"""Backend kinds register themselves here: a name, the config section model, a factory.

The gateway never branches on a kind: `pluggably.app` builds one backend per configured provider
by looking its kind up, and `pluggably.config` validates each provider section against the model
its kind registered. Adding a kind means registering it from its own package; nothing else changes.

A kind may also register presets: provider names that imply the kind and its defaults (for
example `groq` is the OpenAI-compatible kind with Groq's base URL), so `providers: {groq: {}}` is a
complete provider section.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pluggably.core.backend import Backend


@dataclass(frozen=True)
class BackendKind:
    """One kind of backend.

    `config_model` is a pydantic model with a `kind: Literal[name]` field; `factory(provider,
    section)` builds the backend serving the models `provider/...` and must stay cheap (heavy
    imports belong in the backend's `start` or first use). `presets` maps provider names to the
    section defaults they imply.
    """

    name: str
    config_model: type[Any]
    factory: Callable[[str, Any], Backend]
    description: str = ""
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


_KINDS: dict[str, BackendKind] = {}


def register(kind: BackendKind) -> BackendKind:
    if kind.name in _KINDS and _KINDS[kind.name] is not kind:
        raise ValueError(f"backend kind {kind.name!r} is registered twice")
    for other in _KINDS.values():
        clash = set(other.presets) & set(kind.presets)
        if clash and other is not kind:
            raise ValueError(
                f"presets {sorted(clash)} are registered by {other.name!r} and {kind.name!r}"
            )
    _KINDS[kind.name] = kind
    return kind


def kinds() -> Mapping[str, BackendKind]:
    """Every registered kind, by name."""
    return dict(_KINDS)


def kind_for_provider_name(name: str) -> tuple[BackendKind, str | None] | None:
    """The kind a provider name implies when its section names no kind: the kind of that name,
    or the kind owning a preset of that name (returned with the preset)."""
    kind = _KINDS.get(name)
    if kind is not None:
        # A kind may also be a preset of itself (`openai`): the name then implies that preset too,
        # so that `providers: {openai: {base_url: ...}}` is still OpenAI, not a generic endpoint.
        return kind, (name if name in kind.presets else None)
    for kind in _KINDS.values():
        if name in kind.presets:
            return kind, name
    return None
