"""Generated files are committed; they must match what the protos generate today."""

from __future__ import annotations

import filecmp
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
    return subprocess.run([str(BUF), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, **kwargs)


def test_buf_lint_and_format_are_clean() -> None:
    lint = _buf("lint")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _buf("format", "--diff", "--exit-code")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_python_stubs_are_up_to_date(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", "-I", "third_party/googleapis",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         *(str(p.relative_to(REPO_ROOT)) for p in PROTOS)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    generated = sorted(p.name for p in (tmp_path / "pluggably" / "v1").iterdir())
    committed = sorted(p.name for p in (REPO_ROOT / "server" / "pluggably" / "v1").iterdir()
                       if p.suffix in (".py", ".pyi") and p.name != "__init__.py")
    assert generated == committed
    _match, mismatch, errors = filecmp.cmpfiles(
        tmp_path / "pluggably" / "v1", REPO_ROOT / "server" / "pluggably" / "v1", generated, shallow=False)
    assert not mismatch and not errors, f"stale generated files (run `make generate`): {mismatch + errors}"


def test_descriptor_set_is_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "pluggably.pb"
    result = _buf("build", "--as-file-descriptor-set", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == (REPO_ROOT / "envoy" / "pluggably.pb").read_bytes(), "run `make generate`"


def test_descriptor_set_carries_what_envoy_needs() -> None:
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet.FromString((REPO_ROOT / "envoy" / "pluggably.pb").read_bytes())
    names = {f.name for f in fds.file}
    # Without these, error details reach REST clients as an empty body.
    assert {"google/rpc/status.proto", "google/rpc/error_details.proto", "google/api/httpbody.proto"} <= names
    ours = [f for f in fds.file if f.package == "pluggably.v1"]
    assert ours and all(f.source_code_info.location for f in ours)
