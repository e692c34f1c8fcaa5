"""Hosted providers: adapters for provider HTTP APIs over one shared transport layer.

Registers the kinds `openai` (with the OpenAI-compatible presets), `anthropic` and `gemini`.
Importing this package is cheap: adapters (and aiohttp) load when a provider is configured.
"""

from __future__ import annotations

import importlib
from typing import Any

from pluggably.core import plugins
from pluggably.providers.config import AnthropicConfig, GeminiConfig, OpenAIConfig
from pluggably.providers.presets import PRESETS


def _factory(module: str) -> Any:
    def build(provider: str, section: Any) -> Any:
        return importlib.import_module(f"pluggably.providers.{module}").build(provider, section)

    return build


plugins.register(
    plugins.BackendKind(
        name="openai",
        config_model=OpenAIConfig,
        factory=_factory("openai"),
        description="OpenAI Chat Completions and every OpenAI-compatible endpoint",
        # `generic` is what a provider of this kind with its own base_url gets, never a name.
        presets={name: {"preset": name} for name in PRESETS if name != "generic"},
    )
)
plugins.register(
    plugins.BackendKind(
        name="anthropic",
        config_model=AnthropicConfig,
        factory=_factory("anthropic"),
        description="Anthropic Messages API",
    )
)
plugins.register(
    plugins.BackendKind(
        name="gemini",
        config_model=GeminiConfig,
        factory=_factory("gemini"),
        description="Google Gemini API (generateContent)",
    )
)
