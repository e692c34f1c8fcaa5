from __future__ import annotations

from pathlib import Path

import pytest

from pluggably.config import ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_embedded_defaults_serve_no_model() -> None:
    # A production config without `local:` must not serve the gibberish demo model.
    config = load_config(environ={})
    assert config.server.port == 50051
    assert config.local.models == [] and config.providers == {}


def test_demo_config_serves_the_tiny_models() -> None:
    config = load_config(REPO_ROOT / "examples" / "demo.yaml", environ={})
    assert [(m.name, str(m.path), m.modality) for m in config.local.models] == [
        ("tiny-random-llama", "var/models/tiny-random-llama", "text"),
        ("tiny-sd", "var/models/tiny-sd", "image"),
        ("tiny-shape", "var/models/tiny-shape", "mesh"),
    ]


def test_file_then_environment_override(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "server:\n  port: 7000\n  grace_period_s: 3\naliases:\n  tiny: local/tiny-random-llama\n"
    )
    config = load_config(path, environ={"PLUGGABLY_SERVER__PORT": "7001"})
    assert config.server.port == 7001 and config.server.grace_period_s == 3
    assert config.aliases == {"tiny": "local/tiny-random-llama"}


def test_environment_sets_lists(tmp_path: Path) -> None:
    config = load_config(environ={"PLUGGABLY_LOCAL__MODELS": f"[{{name: a, path: {tmp_path}}}]"})
    assert [(m.name, m.path) for m in config.local.models] == [("a", tmp_path)]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("server:\n  port: 70000\n", "server.port"),
        ("server:\n  prot: 1\n", "server.prot"),
        ("local:\n  models:\n    - {name: a, path: /x, device: tpu}\n", "local.models.0.device"),
        (
            "local:\n  models:\n    - {name: a, path: /x}\n    - {name: a, path: /y}\n",
            "local.models",
        ),
        ("aliases:\n  t: no-provider\n", "aliases"),
        ("logging:\n  level: LOUD\n", "logging.level"),
    ],
)
def test_invalid_file_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert f"  {field}:" in str(caught.value) and str(path) in str(caught.value)


def test_unreadable_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, environ={})


def test_environment_scalars_stay_strings_until_typed() -> None:
    # A value that YAML would turn into a number, bool or mapping stays the string it is.
    config = load_config(
        environ={"PLUGGABLY_ALIASES": "{k: 'local/0x10'}", "PLUGGABLY_LOGGING__LEVEL": "DEBUG"}
    )
    assert config.aliases == {"k": "local/0x10"} and config.logging.level == "DEBUG"
    with pytest.raises(ConfigError, match=r"server\.port.*PLUGGABLY_SERVER__PORT"):
        load_config(environ={"PLUGGABLY_SERVER__PORT": "yes"})


def test_error_names_the_variable_that_set_a_nested_field() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"PLUGGABLY_LOCAL__MODELS__0__NAME": "x"})
    assert "PLUGGABLY_LOCAL__MODELS__0__NAME" in str(caught.value)


SECRET = "sk-live-abcdef0123456789secret"


@pytest.mark.parametrize(
    "environ",
    [
        {"PLUGGABLY_ALIASES": f"{{fast: {SECRET}}}"},  # a key pasted into the wrong variable
        {"PLUGGABLY_ALIASES": f"{{fast: [{SECRET}"},  # ...and not even valid YAML
        {"PLUGGABLY_SERVER__PORT": SECRET},
        {"PLUGGABLY_LOCAL__MODELS": f"[{{name: m, path: /m, {SECRET}: 1}}]"},
    ],
)
def test_config_errors_name_the_variable_never_its_value(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ=environ)
    text = str(caught.value)
    (variable,) = environ
    assert variable in text
    assert SECRET not in text and SECRET[3:15] not in text


def test_plaintext_off_loopback_needs_saying_so() -> None:
    with pytest.raises(ConfigError, match="not loopback and TLS is off"):
        load_config(environ={"PLUGGABLY_SERVER__HOST": "0.0.0.0"})
    config = load_config(
        environ={
            "PLUGGABLY_SERVER__HOST": "0.0.0.0",
            "PLUGGABLY_SERVER__ALLOW_PLAINTEXT_REMOTE": "true",
        }
    )
    assert config.server.host == "0.0.0.0"
