#!/usr/bin/env bash
# Starts the gRPC server and Envoy, waits until both answer, prints how to call them, and stops
# both on Ctrl-C (the server drains in-flight requests first).
set -euo pipefail
cd "$(dirname "$0")/.."

GRPC_PORT=${GRPC_PORT:-50051}
HTTP_PORT=${HTTP_PORT:-8080}
HTTP_HOST=${HTTP_HOST:-127.0.0.1}  # 0.0.0.0 exposes Envoy beyond this machine (API keys still required)
ADMIN_PORT=${ADMIN_PORT:-9901}     # Envoy's admin interface, always on 127.0.0.1
METRICS_PORT=${METRICS_PORT:-9464} # the server's Prometheus endpoint, on 127.0.0.1
mkdir -p var
# Auth is on by default: make sure a development key exists (created once, admin scope) and
# say where it is. The README's examples read it from var/dev-key.
.venv/bin/pluggably keys ensure-dev --out var/dev-key
# The shipped Envoy config with this run's ports and the gateway config's size limits (the same
# renderer the tests and bench use). TLS on Envoy's listener: ENVOY_TLS_CERT and ENVOY_TLS_KEY
# (PEM files); a non-loopback HTTP_HOST without them needs ALLOW_PLAINTEXT_REMOTE=1.
envoy_flags=()
if [ -n "${ENVOY_TLS_CERT:-}" ]; then envoy_flags+=(--tls-cert "$ENVOY_TLS_CERT" --tls-key "${ENVOY_TLS_KEY:?ENVOY_TLS_KEY goes with ENVOY_TLS_CERT}"); fi
if [ "${ALLOW_PLAINTEXT_REMOTE:-0}" = 1 ]; then envoy_flags+=(--allow-plaintext-remote); fi
# A gRPC server with TLS (server.tls in the config): Envoy verifies it against UPSTREAM_CA.
server_tls=$(.venv/bin/python -c 'from pluggably.config import load_config; print(int(load_config().server.tls.enabled))')
probe_tls=(-plaintext)
if [ "$server_tls" = 1 ]; then
    envoy_flags+=(--upstream-ca "${UPSTREAM_CA:?server.tls is on: set UPSTREAM_CA to the CA that signed the server certificate}")
    probe_tls=(-insecure)  # the readiness probe only asks whether it answers
fi
scheme=http; [ -n "${ENVOY_TLS_CERT:-}" ] && scheme=https
.venv/bin/python -m pluggably.devtools.envoy render --from-config --grpc-port "$GRPC_PORT" --http-port "$HTTP_PORT" \
    --http-host "$HTTP_HOST" --admin-port "$ADMIN_PORT" "${envoy_flags[@]}" -o "var/envoy-${HTTP_PORT}.yaml"

server_pid=""; envoy_pid=""
# The server drains first (in-flight requests get its grace period, still through Envoy), then
# Envoy stops. Envoy runs in its own session so that Ctrl-C reaches only this script and the
# server, not Envoy.
stop() {
    trap - EXIT INT TERM
    if [ -n "$server_pid" ]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    if [ -n "$envoy_pid" ]; then kill -TERM "$envoy_pid" 2>/dev/null || true; wait "$envoy_pid" 2>/dev/null || true; fi
}
trap stop EXIT INT TERM

PLUGGABLY_SERVER__PORT=$GRPC_PORT PLUGGABLY_METRICS__PORT=$METRICS_PORT .venv/bin/pluggably-server &
server_pid=$!
for _ in $(seq 100); do
    if .venv/bin/grpcurl "${probe_tls[@]}" "localhost:${GRPC_PORT}" grpc.health.v1.Health/Check >/dev/null 2>&1; then break; fi
    kill -0 "$server_pid" 2>/dev/null || { echo "the gRPC server exited; see the log above" >&2; exit 1; }
    sleep 0.1
done

setsid .venv/bin/envoy -c "var/envoy-${HTTP_PORT}.yaml" --log-level warn --disable-hot-restart &
envoy_pid=$!
for _ in $(seq 100); do
    if curl -fsSk "${scheme}://localhost:${HTTP_PORT}/openapi.json" >/dev/null 2>&1; then break; fi
    kill -0 "$envoy_pid" 2>/dev/null || { echo "Envoy exited; see the log above" >&2; exit 1; }
    sleep 0.1
done

cat <<MSG

Pluggably is up.
  gRPC (native, reflection):   localhost:${GRPC_PORT}
  REST + SSE + gRPC via Envoy: ${scheme}://localhost:${HTTP_PORT}   (OpenAPI: ${scheme}://localhost:${HTTP_PORT}/openapi.json)

  Metrics (Prometheus):         http://localhost:${METRICS_PORT}/metrics   (Envoy's: http://localhost:${ADMIN_PORT}/stats/prometheus)
  API key (admin, development): var/dev-key

Try (the demo model is a tiny random network: its output is gibberish):
  .venv/bin/grpcurl -plaintext localhost:${GRPC_PORT} list
  .venv/bin/grpcurl -plaintext -H "authorization: Bearer \$(cat var/dev-key)" \\
      -d '{"model":"local/tiny-random-llama","messages":[{"role":"user","content":"Hello"}],"text":{"maxTokens":16,"seed":1}}' \\
      localhost:${GRPC_PORT} pluggably.v1.StreamService/StreamGenerate
  curl -s localhost:${HTTP_PORT}/v1/models -H "authorization: Bearer \$(cat var/dev-key)"
  curl -sN localhost:${HTTP_PORT}/v1/generate:stream -H "authorization: Bearer \$(cat var/dev-key)" \\
      -H 'content-type: application/json' \\
      -d '{"model":"local/tiny-random-llama","messages":[{"role":"user","content":"Hello"}],"text":{"maxTokens":16,"seed":1}}'

Ctrl-C stops both.
MSG

wait -n "$server_pid" "$envoy_pid"
