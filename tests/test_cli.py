"""`pluggably keys ...`: in-process through `main()`, and once as the installed script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pluggably.cli import main
from pluggably.security import scopes
from pluggably.security.keys import KeyStore, hash_key


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PLUGGABLY_AUTH__STORE", raising=False)
    monkeypatch.delenv("PLUGGABLY_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_create_prints_the_key_once(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    store = str(tmp_path / "keys.db")
    code, out, err = run(capsys, "keys", "create", "--name", "alice", "--store", store)
    assert code == 0
    key = out.strip()
    assert key.startswith("pk_") and "\n" not in key
    assert key not in err and key[:15] in err and "only this once" in err
    with KeyStore(store) as opened:
        principal = opened.authenticate(key)
    assert principal is not None and principal.name == "alice"
    assert principal.scopes == frozenset({"generate", "models:read"})  # the default scopes
    assert principal.models is None


def test_create_with_every_option(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    store = str(tmp_path / "keys.db")
    argv = ["keys", "create", "--name", "ci", "--scope", "models:read", "--scope", "models:write"]
    argv += ["--model", "local/tiny", "--model", "openai/*", "--rpm", "10", "--tpm", "2000"]
    argv += ["--streams", "3", "--expires-in", "1.5", "--store", store]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    with KeyStore(store) as opened:
        principal = opened.authenticate(out.strip())
        (record,) = opened.list()
    assert principal is not None
    assert principal.scopes == frozenset({"models:read", "models:write"})
    assert principal.models == frozenset({"local/tiny", "openai/*"})
    assert (record.limits.requests_per_minute, record.limits.tokens_per_minute) == (10, 2000)
    assert record.limits.concurrent_streams == 3
    assert record.expires_at is not None
    lifetime = (record.expires_at - record.created_at).total_seconds()
    assert abs(lifetime - 1.5 * 86400) < 60


def test_create_out_writes_an_owner_only_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_file = tmp_path / "secrets" / "ci-key"
    argv = ["keys", "create", "--name", "ci", "--out", str(out_file), "--store", "keys.db"]
    code, out, err = run(capsys, *argv)
    assert code == 0 and err == ""
    key = out_file.read_text().strip()
    assert (out_file.stat().st_mode & 0o777) == 0o600
    assert key not in out and str(out_file) in out
    assert not [p for p in out_file.parent.iterdir() if p.name != "ci-key"]  # no temp file left

    # An existing file is never overwritten, and the refusal leaves no key behind.
    code, out, err = run(capsys, *argv)
    assert code == 2 and "exists" in err and out == ""
    assert out_file.read_text().strip() == key
    with KeyStore(tmp_path / "keys.db") as opened:
        assert len(opened.list()) == 1


def test_bad_scope_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["keys", "create", "--name", "x", "--scope", "generate", "--scope", "root"]
    code, out, err = run(capsys, *argv, "--store", "keys.db")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "root" in err and err.startswith("pluggably: error:")
    with KeyStore(tmp_path / "keys.db") as opened:
        assert opened.list(include_revoked=True) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "create"],  # no --name
        ["keys", "create", "--name", "x", "--rpm", "0"],
        ["keys", "create", "--name", "x", "--expires-in", "-1"],
        ["keys"],
        ["nosuchgroup"],
    ],
)
def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_list_shows_no_key_material(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    keys = []
    for name in ("alice", "bob"):
        _, out, _ = run(capsys, "keys", "create", "--name", name, "--store", "keys.db")
        keys.append(out.strip())
    run(capsys, "keys", "revoke", keys[1][:15], "--store", "keys.db")

    code, out, _ = run(capsys, "keys", "list", "--json", "--all", "--store", "keys.db")
    assert code == 0
    listed = json.loads(out)
    assert [(k["name"], k["status"]) for k in listed] == [("alice", "active"), ("bob", "revoked")]
    assert listed[0]["prefix"] == keys[0][:15] and listed[0]["scopes"] == list(scopes.SCOPES[:2])
    code, table, _ = run(capsys, "keys", "list", "--store", "keys.db")
    assert code == 0 and "alice" in table and "bob" not in table
    code, table_all, _ = run(capsys, "keys", "list", "--all", "--store", "keys.db")
    assert "bob" in table_all and "revoked" in table_all
    for shown in (out, table, table_all):
        for key in keys:
            assert key[16:] not in shown and hash_key(key) not in shown

    code, out, _ = run(capsys, "keys", "list", "--json", "--store", "empty.db")
    assert code == 0 and json.loads(out) == []


def test_revoke(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _, key, _ = run(capsys, "keys", "create", "--name", "alice", "--store", "keys.db")
    key = key.strip()
    with KeyStore(tmp_path / "keys.db") as server:
        assert server.authenticate(key) is not None
        code, out, _ = run(capsys, "keys", "revoke", key[:15], "--store", "keys.db")
        assert code == 0 and "Revoked" in out and key[:15] in out
        assert server.authenticate(key) is None  # the next call, same open store
    code, out, _ = run(capsys, "keys", "revoke", key[3:15], "--store", "keys.db")
    assert code == 0 and "already revoked" in out

    code, out, err = run(capsys, "keys", "revoke", "pk_aaaaaaaaaaaa", "--store", "keys.db")
    assert code == 1 and out == "" and "no such key" in err
    # A full key pasted by mistake is never echoed back.
    unknown = "pk_aaaaaaaaaaaa_" + key[16:]
    code, out, err = run(capsys, "keys", "revoke", unknown, "--store", "keys.db")
    assert code == 1 and key[16:] not in out + err


def test_ensure_dev_is_idempotent_and_replaces_a_dead_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "keys", "ensure-dev", "--out", "var/dev-key")
    assert code == 0 and "var/dev-key" in out and "authorization: Bearer" in out
    dev_file = tmp_path / "var" / "dev-key"  # the default store sits next to it, in var/
    first = dev_file.read_text().strip()
    assert (dev_file.stat().st_mode & 0o777) == 0o600
    with KeyStore(tmp_path / "var" / "keys.db") as store:
        principal = store.authenticate(first)
        assert principal is not None and principal.name == "dev"
        assert principal.scopes == frozenset(scopes.SCOPES)

    code, out, _ = run(capsys, "keys", "ensure-dev", "--out", "var/dev-key")
    assert code == 0 and first[:15] in out and first not in out
    assert dev_file.read_text().strip() == first
    with KeyStore(tmp_path / "var" / "keys.db") as store:
        assert len(store.list(include_revoked=True)) == 1
        store.revoke(first)

    code, _, _ = run(capsys, "keys", "ensure-dev", "--out", "var/dev-key")
    second = dev_file.read_text().strip()
    assert code == 0 and second != first
    assert (dev_file.stat().st_mode & 0o777) == 0o600
    dev_file.write_text("not a key\n")
    code, _, _ = run(capsys, "keys", "ensure-dev", "--out", "var/dev-key")
    third = dev_file.read_text().strip()
    assert code == 0 and third not in (first, second)
    with KeyStore(tmp_path / "var" / "keys.db") as store:
        assert [r.name for r in store.list()] == ["dev", "dev"]  # the second and the third
        assert store.authenticate(first) is None and store.authenticate(third) is not None


def test_store_location_precedence(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def names(store: Path) -> list[str]:
        with KeyStore(store) as opened:
            return [r.name for r in opened.list()]

    config = tmp_path / "pluggably.yaml"
    config.write_text(f"auth:\n  store: {tmp_path / 'from-config.db'}\n")

    run(capsys, "keys", "create", "--name", "default")
    assert names(tmp_path / "var" / "keys.db") == ["default"]
    run(capsys, "keys", "create", "--name", "config", "--config", str(config))
    assert names(tmp_path / "from-config.db") == ["config"]
    monkeypatch.setenv("PLUGGABLY_CONFIG", str(config))
    run(capsys, "keys", "create", "--name", "config-env")
    assert names(tmp_path / "from-config.db") == ["config", "config-env"]
    monkeypatch.setenv("PLUGGABLY_AUTH__STORE", str(tmp_path / "from-env.db"))
    run(capsys, "keys", "create", "--name", "env")
    assert names(tmp_path / "from-env.db") == ["env"]
    run(capsys, "--store", "top.db", "keys", "create", "--name", "top")
    run(capsys, "keys", "create", "--name", "flag", "--store", "flag.db")
    assert names(tmp_path / "top.db") == ["top"] and names(tmp_path / "flag.db") == ["flag"]


def test_config_and_store_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("auth:\n  stroe: x.db\n")
    code, out, err = run(capsys, "keys", "list", "--config", str(bad))
    assert code == 2 and out == "" and "auth.stroe" in err
    code, _, err = run(capsys, "keys", "list", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "cannot read config file" in err
    (tmp_path / "junk.db").write_bytes(b"junk" * 1000)
    code, _, err = run(capsys, "keys", "list", "--store", "junk.db")
    assert code == 2 and err.startswith("pluggably: error: cannot open key store")


def test_installed_script(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("pluggably")
    assert script.exists(), "run `pip install -e .` so that the `pluggably` script exists"
    store = str(tmp_path / "keys.db")

    def call(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(script), *argv, "--store", store],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    created = call("keys", "create", "--name", "alice")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert call("keys", "revoke", key[:15]).returncode == 0
    missing = call("keys", "revoke", "pk_aaaaaaaaaaaa")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    with KeyStore(store) as opened:
        assert opened.authenticate(key) is None
