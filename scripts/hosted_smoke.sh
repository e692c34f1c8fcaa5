#!/usr/bin/env bash
# CI leg without the `[local]` extra: in a second virtual environment holding only the base
# dependencies (`pip install -e .`, no torch, no dev tools), start the OpenAI stand-in and the
# gateway configured for it, serve one Generate (and one StreamGenerate) through the gateway, and
# check the reply. A hosted-only deployment must not need torch to start or to serve.
#
#   scripts/hosted_smoke.sh            (or `make hosted-smoke`)
#
# Environment: PYTHON (interpreter for the venv, default python3), HOSTED_VENV (default
# .venv-hosted; reused while it is newer than pyproject.toml), SMOKE_TIMEOUT_S (default 60: how
# long each process may take to come up).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${HOSTED_VENV:-.venv-hosted}
TIMEOUT_S=${SMOKE_TIMEOUT_S:-60}
PY="$VENV/bin/python"

# The caller's PLUGGABLY_* overrides would change the config under test; the stand-in and the
# gateway talk over loopback, which a CI proxy must not intercept.
while IFS= read -r name; do unset "$name"; done < <(compgen -e | grep '^PLUGGABLY_' || true)
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"
export no_proxy="$NO_PROXY"

step_start=$SECONDS
if [ ! -f "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
    echo "hosted-smoke: creating $VENV (pip install -e . : no extras)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check -e .
    touch "$VENV/.installed"
fi
echo "hosted-smoke: venv ready in $((SECONDS - step_start)) s"

# The point of this leg: the extra is really absent. A venv that gained torch (by hand, or a
# dependency that started pulling it in) would make the check below prove nothing.
for module in torch transformers; do
    if "$PY" -c "import $module" >/dev/null 2>&1; then
        echo "hosted-smoke: '$module' is importable in $VENV; this leg must run without [local]" >&2
        exit 1
    fi
done

work=$(mktemp -d)
standin_pid=""
server_pid=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # The gateway first: it holds connections to the stand-in.
    for pid in "$server_pid" "$standin_pid"; do
        if [ -n "$pid" ]; then
            kill -TERM "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    if [ "$rc" -ne 0 ]; then
        for log in "$work"/*.log; do
            [ -f "$log" ] || continue
            echo "----- $(basename "$log") -----" >&2
            tail -n 40 "$log" >&2
        done
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_for_line FILE REGEX PID WHAT: the first capture group of the first line of FILE matching
# REGEX, once the process PID has written it; fails when PID exits first or time runs out.
wait_for_line() {
    local file=$1 regex=$2 pid=$3 what=$4 deadline=$((SECONDS + TIMEOUT_S)) value
    while ((SECONDS < deadline)); do
        value=$(sed -nE "s/.*${regex}.*/\\1/p" "$file" 2>/dev/null | head -n 1)
        if [ -n "$value" ]; then
            echo "$value"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "hosted-smoke: $what exited before it was ready" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "hosted-smoke: $what not ready after ${TIMEOUT_S} s" >&2
    return 1
}

step_start=$SECONDS
# Port 0 everywhere: each process binds a free port itself and says which one it got.
"$PY" -m pluggably.devtools.standins openai --port 0 --api-key test >"$work/standin.log" 2>&1 &
standin_pid=$!
standin_port=$(wait_for_line "$work/standin.log" 'listening on ([0-9]+)' "$standin_pid" "the OpenAI stand-in")

cat >"$work/config.yaml" <<YAML
server: {host: 127.0.0.1, port: 0}
logging: {format: text}
auth: {enabled: false}
metrics: {enabled: false}
providers:
  openai:
    base_url: http://127.0.0.1:${standin_port}/v1
    api_key: test
    # Configured, so the request does not depend on the background model listing.
    models: [{name: gpt-4o-mini}]
YAML

"$VENV/bin/pluggably-server" --config "$work/config.yaml" >"$work/gateway.log" 2>&1 &
server_pid=$!
grpc_port=$(wait_for_line "$work/gateway.log" 'serving on [^ ]*:([0-9]+)' "$server_pid" "the gateway")
echo "hosted-smoke: stand-in on :$standin_port, gateway on :$grpc_port after $((SECONDS - step_start)) s"

"$PY" - "127.0.0.1:$grpc_port" "$TIMEOUT_S" <<'PY'
"""One unary and one streamed generation through the gateway, with the committed stubs."""

import sys

import grpc

from pluggably.v1 import generate_service_pb2_grpc, generation_pb2, stream_service_pb2_grpc

target, timeout = sys.argv[1], float(sys.argv[2])
expected = "Hello from the openai stand-in. You said: ping from the hosted smoke test"
request = generation_pb2.GenerateRequest(
    model="openai/gpt-4o-mini",
    messages=[generation_pb2.ChatMessage(role="user", content="ping from the hosted smoke test")],
)
with grpc.insecure_channel(target) as channel:
    reply = generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(
        request, timeout=timeout
    )
    stream = stream_service_pb2_grpc.StreamServiceStub(channel).StreamGenerate(
        request, timeout=timeout
    )
    events = list(stream)
if reply.text != expected:
    sys.exit(f"hosted-smoke: Generate answered {reply.text!r}, expected {expected!r}")
streamed = "".join(e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta")
if streamed != expected or events[-1].WhichOneof("event") != "done":
    sys.exit(f"hosted-smoke: StreamGenerate gave {streamed!r}, last event {events[-1]}")
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
if heavy:
    sys.exit(f"hosted-smoke: the client imported {heavy}")
print(f"hosted-smoke: Generate and StreamGenerate answered {reply.text!r}")
PY

# A clean stop is part of the check: SIGTERM drains and exits 0.
kill -TERM "$server_pid"
if ! wait "$server_pid"; then
    server_pid=""
    echo "hosted-smoke: the gateway did not exit cleanly on SIGTERM" >&2
    exit 1
fi
server_pid=""
echo "hosted-smoke: ok"
