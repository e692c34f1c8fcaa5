"""Generated files are committed; they must match what the protos generate today."""

from __future__ import annotations

import filecmp
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BUF = REPO_ROOT / "node_modules" / ".bin" / "buf"
PROTOS = sorted((REPO_ROOT / "proto" / "pluggably" / "v1").glob("*.proto"))


def _buf(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    if not BUF.exists():
        pytest.fail("buf is not installed: run `make install` (npm @bufbuild/buf)")
    return subprocess.run(
        [str(BUF), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, **kwargs
    )


def test_buf_lint_and_format_are_clean() -> None:
    lint = _buf("lint")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _buf("format", "--diff", "--exit-code")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_python_stubs_are_up_to_date(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            "proto",
            "-I",
            "third_party/googleapis",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *(str(p.relative_to(REPO_ROOT)) for p in PROTOS),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    generated = sorted(p.name for p in (tmp_path / "pluggably" / "v1").iterdir())
    committed = sorted(
        p.name
        for p in (REPO_ROOT / "server" / "pluggably" / "v1").iterdir()
        if p.suffix in (".py", ".pyi") and p.name != "__init__.py"
    )
    assert generated == committed
    _match, mismatch, errors = filecmp.cmpfiles(
        tmp_path / "pluggably" / "v1",
        REPO_ROOT / "server" / "pluggably" / "v1",
        generated,
        shallow=False,
    )
    assert not mismatch and not errors, (
        f"stale generated files (run `make generate`): {mismatch + errors}"
    )


def test_descriptor_set_is_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "pluggably.pb"
    result = _buf("build", "--as-file-descriptor-set", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == (REPO_ROOT / "envoy" / "pluggably.pb").read_bytes(), (
        "run `make generate`"
    )


def test_descriptor_set_carries_what_envoy_needs() -> None:
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet.FromString(
        (REPO_ROOT / "envoy" / "pluggably.pb").read_bytes()
    )
    names = {f.name for f in fds.file}
    # Without these, error details reach REST clients as an empty body.
    assert {
        "google/rpc/status.proto",
        "google/rpc/error_details.proto",
        "google/api/httpbody.proto",
    } <= names
    ours = [f for f in fds.file if f.package == "pluggably.v1"]
    assert ours and all(f.source_code_info.location for f in ours)


BASELINE = REPO_ROOT / "proto" / "baseline"


def _image(path: Path):
    from google.protobuf import descriptor_pb2

    return descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())


def _messages(fds) -> dict[str, object]:
    out = {}
    for f in fds.file:
        for m in f.message_type:
            out[f"{f.package}.{m.name}"] = m
    return out


def test_make_breaking_passes() -> None:
    result = subprocess.run(
        ["make", "-s", "breaking"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_breaking_check_catches_a_breaking_change(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(
        REPO_ROOT / "proto", tmp_path / "proto", ignore=shutil.ignore_patterns("baseline")
    )
    shutil.copytree(REPO_ROOT / "third_party", tmp_path / "third_party")
    shutil.copy(REPO_ROOT / "buf.yaml", tmp_path / "buf.yaml")
    generation = tmp_path / "proto" / "pluggably" / "v1" / "generation.proto"
    text = generation.read_text()
    assert "  optional int64 seed = 5;" in text
    generation.write_text(text.replace("  optional int64 seed = 5;", "  optional int32 seed = 5;"))
    image = tmp_path / "contract.binpb"
    assert _buf("build", str(tmp_path), "--exclude-source-info", "-o", str(image)).returncode == 0
    for baseline in ("v1.binpb", "v1-foundation.binpb"):
        result = _buf(
            "breaking",
            str(image),
            "--against",
            str(BASELINE / baseline),
            "--config",
            '{"version":"v2","breaking":{"use":["WIRE_JSON"]}}',
        )
        assert result.returncode != 0 and "seed" in result.stdout, result.stdout + result.stderr


def test_renamed_messages_kept_every_field() -> None:
    """The one rename round must be wire- and JSON-compatible: same numbers, names, types."""
    renames = {"pluggably.v1.Message": "pluggably.v1.ChatMessage"}
    before = _messages(_image(BASELINE / "v1-foundation.binpb"))
    after = _messages(_image(BASELINE / "v1.binpb"))
    for old, new in renames.items():
        assert old in before and new in after and old not in after
        old_fields = {(f.number, f.name, f.type, f.json_name, f.label) for f in before[old].field}
        new_fields = {(f.number, f.name, f.type, f.json_name, f.label) for f in after[new].field}
        assert old_fields <= new_fields
    # Every other message of the first release kept its name and its fields.
    for name, message in before.items():
        if name in renames or not name.startswith("pluggably."):
            continue
        kept = {(f.number, f.name, f.type) for f in after[name].field}
        assert {(f.number, f.name, f.type) for f in message.field} <= kept, name


def test_baseline_is_the_current_contract_or_older() -> None:
    """proto/baseline/v1.binpb is the contract as released by the providers change; the working
    tree may only add to it (checked by `make breaking`), never lack one of its messages."""
    released = _messages(_image(BASELINE / "v1.binpb"))
    current = _messages(descriptor_pb2_set())
    assert set(released) <= set(current)


def descriptor_pb2_set():
    return _image(REPO_ROOT / "envoy" / "pluggably.pb")


def test_every_rpc_documents_the_scope_it_needs() -> None:
    """The proto comments are the API docs: each RPC says which key scope it needs, and that
    is the scope the server enforces (security/scopes.py)."""
    from pluggably.security.scopes import METHOD_SCOPES

    fds = _image(REPO_ROOT / "envoy" / "pluggably.pb")
    documented: dict[str, str] = {}
    for file in fds.file:
        if not file.package.startswith("pluggably."):
            continue
        # path [6, service, 2, method]: FileDescriptorProto.service / ServiceDescriptorProto.method
        comments = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}
        for s, service in enumerate(file.service):
            for m, method in enumerate(service.method):
                comment = comments.get((6, s, 2, m), "")
                found = re.search(r"the scope `([a-z:]+)`", comment)
                documented[f"/{file.package}.{service.name}/{method.name}"] = (
                    found.group(1) if found else ""
                )
    assert documented == METHOD_SCOPES
