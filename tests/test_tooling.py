"""The type-checking setup in pyproject.toml does what `make lint` promises: core/ gets every
check that `mypy --strict` turns on, and only core/ (mypy's `strict = true` in a per-module
section would silently apply to every module, so the flags are listed one by one there)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy.main import process_options
from mypy.options import Options

ROOT = Path(__file__).resolve().parent.parent


def _options(*args: str) -> Options:
    # A file name is required by the parser; it is never read.
    _, options = process_options([*args, "probe.py"])
    return options


@pytest.fixture(scope="module")
def strict_flags() -> dict[str, object]:
    """What `--strict` changes in this mypy version, so a new strict flag is noticed here."""
    plain = _options("--config-file", "").snapshot()
    strict = _options("--config-file", "", "--strict").snapshot()
    flags = {name: value for name, value in strict.items() if plain.get(name) != value}
    assert "disallow_untyped_defs" in flags  # the comparison found the strict set at all
    return flags


@pytest.fixture(scope="module")
def project() -> Options:
    return _options("--config-file", str(ROOT / "pyproject.toml"))


@pytest.mark.parametrize("module", ["pluggably.core.types", "pluggably.core.context"])
def test_core_gets_every_strict_check(
    project: Options, strict_flags: dict[str, object], module: str
) -> None:
    effective = project.clone_for_module(module).snapshot()
    missing = {name: value for name, value in strict_flags.items() if effective.get(name) != value}
    assert missing == {}


def test_strict_does_not_leak_beyond_core(project: Options) -> None:
    for module in ("pluggably.server", "pluggably.api.interceptors", "pluggably.devtools.envoy"):
        effective = project.clone_for_module(module)
        assert not effective.disallow_untyped_defs, module
        assert not effective.warn_return_any, module


def test_checks_the_server_but_not_the_generated_stubs(project: Options) -> None:
    assert project.files == ["server/pluggably"]
    assert project.clone_for_module("pluggably.v1.generation_pb2").ignore_errors
    assert not project.clone_for_module("pluggably.core.types").ignore_errors
    assert not project.clone_for_module("pluggably.generation.router").ignore_errors
