"""Shared fixtures. Expensive things (the tiny model, servers, Envoy) are built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama chat model with its tokenizer, built offline."""
    from pluggably.tools.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("models") / "tiny-random-llama"
    build_tiny_model(out)
    return out
