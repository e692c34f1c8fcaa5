"""The configs the README and examples/ show are valid, and the README's provider table lists
every preset: what the documentation tells people to paste must start."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pluggably.config import load_config
from pluggably.providers.presets import PRESETS

REPO_ROOT = Path(__file__).resolve().parent.parent
README = (REPO_ROOT / "README.md").read_text()
YAML_BLOCKS = re.findall(r"```yaml\n(.*?)```", README, re.S)


def test_readme_has_config_blocks() -> None:
    assert len(YAML_BLOCKS) >= 4


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=lambda b: b.split("\n", 1)[0][:40])
def test_readme_config_blocks_validate(block: str, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(block)
    assert isinstance(yaml.safe_load(block), dict)
    load_config(path, environ={})


@pytest.mark.parametrize(
    "path", sorted((REPO_ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_example_configs_validate(path: Path) -> None:
    load_config(path, environ={})


def test_readme_provider_table_lists_every_preset() -> None:
    table = README.split("| provider (kind / preset) |", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"^\| `([a-z]+)` \|", table, re.M))
    assert {name for name in PRESETS if name != "generic"} | {"anthropic", "gemini"} == listed
